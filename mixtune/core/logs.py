"""The Prefect run logger inside a flow or task (so lines reach the Prefect UI), a plain logger outside."""

import logging

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("mixtune")

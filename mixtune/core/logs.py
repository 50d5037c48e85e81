"""The Prefect run logger inside a flow or task (so lines reach the Prefect UI), a plain logger outside."""

import logging

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("mixtune")


class WithoutTraceback(logging.Filter):
    """Prefect logs every failure with its traceback. A refusal (bad config or input, a full disk, a server that
    is down) is fully said by its message: its record keeps the message and drops the traceback."""

    def __init__(self, kinds: tuple[type[BaseException], ...]):
        super().__init__()
        self.kinds = kinds

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        if isinstance(err, self.kinds):
            record.msg, record.args = "%s: %s", (type(err).__name__, err)
            record.exc_info = record.exc_text = None
        return True


def log_refusals_without_traceback(*kinds: type[BaseException]) -> None:
    """On the loggers Prefect's flow and task engines report failures with (and the Prefect UI shows)."""
    refusals = WithoutTraceback(kinds)
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, WithoutTraceback) for f in logger.filters):
            logger.addFilter(refusals)

"""Retries are for what can pass (a busy server, a killed worker), not for bad input: retrying a file that
cannot be read only delays the message."""

from __future__ import annotations


def retry_unless(*permanent: type[BaseException]):
    """A Prefect retry_condition_fn that retries every failure except the `permanent` exception types."""

    def should_retry(task, task_run, state) -> bool:
        try:
            state.result()
        except permanent:
            return False
        except BaseException:
            return True
        return True

    return should_retry

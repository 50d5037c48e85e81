"""The Prefect run logger inside a flow or task (so lines reach the Prefect UI), a plain logger outside; and
log lines routed above a live progress display while one is drawn."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from rich.console import Console
from rich.file_proxy import FileProxy


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


@contextmanager
def logs_above(console: Console) -> Iterator[None]:
    """While a live display draws on `console`, every log handler that writes to the same terminal writes
    through it instead: rich then lifts the display, prints the line and draws the display again below it.
    Two writers on one terminal otherwise glue a log line onto the display's line (Prefect's console handler
    keeps its own rich Console on the stderr it found at start-up, so redirecting sys.stderr misses it)."""
    routed = [(h, stream) for h in handlers() if (stream := handler_stream(h)) and same_terminal(stream, console.file)]
    for handler, stream in routed:
        set_handler_stream(handler, LinesAbove(console, stream))
    try:
        yield
    finally:
        for handler, stream in routed:
            set_handler_stream(handler, stream)


class LinesAbove(FileProxy):
    """rich's FileProxy (what a live display puts in place of sys.stderr: whole lines printed through its
    Console), made opaque. A Console looks through a FileProxy to the file beneath, so that one made while a
    display runs does not print into it; a log handler's own Console would then write past the display."""

    @property
    def rich_proxied_file(self):
        raise AttributeError("rich_proxied_file")


def handlers() -> list[logging.Handler]:
    loggers = [logging.root, *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    unique = {id(h): h for logger in loggers for h in logger.handlers}
    return list(unique.values())


def handler_stream(handler: logging.Handler) -> IO[str] | None:
    console = getattr(handler, "console", None)  # Prefect's and rich's handlers print through their Console
    if isinstance(console, Console):
        return console.file
    return handler.stream if isinstance(handler, logging.StreamHandler) else None


def set_handler_stream(handler: logging.Handler, stream: IO[str]) -> None:
    console = getattr(handler, "console", None)
    if isinstance(console, Console):
        console.file = stream
    elif isinstance(handler, logging.StreamHandler):
        handler.setStream(stream)


def same_terminal(stream: IO[str], terminal: IO[str]) -> bool:
    """The same stream, or two streams on one terminal device (stdout and stderr of a shell share it)."""
    if stream is terminal:
        return True
    if isinstance(stream, FileProxy):  # already printing through some console
        return False
    try:
        if not (stream.isatty() and terminal.isatty()):
            return False
        return os.fstat(stream.fileno()).st_rdev == os.fstat(terminal.fileno()).st_rdev
    except (AttributeError, OSError, ValueError):  # a closed stream, or one without a file descriptor
        return False

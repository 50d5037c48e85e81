"""The live progress bar: drawn on a terminal, silent elsewhere (the plain log lines carry the numbers); log
lines print above it, never on its line."""

import io
import logging
import re
from types import SimpleNamespace

from prefect.logging.handlers import PrefectConsoleHandler

from tasks.callbacks import LiveBar, LiveProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def train_steps(progress: LiveProgress, steps: int) -> None:
    state = SimpleNamespace(global_step=0, max_steps=steps, num_input_tokens_seen=0)
    progress.on_train_begin(None, state, None)
    for step in range(1, steps + 1):
        state.global_step, state.num_input_tokens_seen = step, step * 512
        progress.on_log(None, state, None, logs={"loss": 2.5, "eval_domain_loss": 3.25})
        progress.on_step_end(None, state, None)
    progress.on_train_end(None, state, None)


def test_a_terminal_gets_a_bar_with_stage_step_losses_and_time_left():
    screen = Terminal()
    progress = LiveProgress("stage 2/4", screen)
    train_steps(progress, 3)
    assert "loss 2.500" in progress.numbers() and "domain val 3.250" in progress.numbers()
    assert "tok/s" in progress.numbers()
    assert "stage 2/4" in screen.getvalue()


def test_a_log_file_gets_no_bar():
    log = io.StringIO()
    train_steps(LiveProgress("stage 1/1", log), 3)
    assert log.getvalue() == ""


CONTROL = re.compile(r"(\x1b\[[?\d;]*[A-Za-z]|\r|\n)")


def screen_lines(output: str) -> list[str]:
    """The lines a terminal shows after `output`: as much of a VT100 as rich's live display uses (carriage
    return, new line, cursor up, erase line; colours and cursor visibility draw nothing)."""
    lines, row, col = [""], 0, 0
    for token in filter(None, CONTROL.split(output)):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        elif token.startswith("\x1b["):
            if token.endswith("A"):
                row = max(0, row - int(token[2:-1] or 1))
            elif token.endswith("K"):
                lines[row] = "" if token[2:-1] == "2" else lines[row][:col]
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + token + line[col + len(token) :]
            col += len(token)
    return lines


def test_log_lines_print_above_the_bar_and_never_share_its_line():
    screen = Terminal()
    prefect_console = PrefectConsoleHandler(stream=screen)  # what Prefect's loggers print through
    plain = logging.StreamHandler(screen)
    logger = logging.getLogger("tests.progress")
    logger.setLevel(logging.INFO)
    for handler in (prefect_console, plain):
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    try:
        with LiveBar("pretrain", 3, stream=screen) as bar:
            for step in range(1, 4):
                bar.update(completed=step, numbers=f"loss {step}")
                logger.info("pretrain step %d/3", step)
    finally:
        for handler in (prefect_console, plain):
            logger.removeHandler(handler)
    drawn = re.sub(r"\x1b\[[?\d;]*[A-Za-z]", "", screen.getvalue())  # colours, cursor moves: none is text
    assert "pretrain ━━━" in drawn  # the bar was drawn
    logged = [line for line in screen_lines(screen.getvalue()) if "step" in line]
    assert logged == [f"pretrain step {step}/3" for step in (1, 2, 3) for _ in range(2)], logged
    assert prefect_console.console.file is screen and plain.stream is screen  # given back when the bar ends

"""The live progress bar: drawn on a terminal, silent elsewhere (the plain log lines carry the numbers)."""

import io
from types import SimpleNamespace

from tasks.callbacks import LiveProgress


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

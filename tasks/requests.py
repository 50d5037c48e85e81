"""What the tasks after the baseline are given, one record each instead of the same eight arguments: the run's
(publish, challenge) and a stage's (train, gate). Plain data: Prefect passes them to tasks and hashes them, and
the processes torchrun starts read a stage's request from a JSON file."""

from __future__ import annotations

from pydantic import BaseModel

from mixtune.core.config import PipelineConfig
from tasks.records import StageMix, TokenLosses
from tasks.tracking import Tracker


class StageRequest(BaseModel):
    """One stage: what it trains on and from, where it goes, and what it is judged against."""

    config: PipelineConfig
    mix: StageMix
    sft_path: str  # the token table the mix indexes, with the validation sets
    init_dir: str  # the model the stage starts from: the previous stage's, or the base model
    base_dir: str
    stage_dir: str
    tracker: Tracker  # the stage's own run
    # The base model's losses: training stops mid-stage past the forgetting budget, and the gate judges the stage
    # against them. None: a stage trained on its own, with neither.
    baseline: TokenLosses | None = None


class RunRequest(BaseModel):
    """The run, once its base model is measured: what its stages share and its final model is published and
    challenged with."""

    config: PipelineConfig  # as planned
    tracker: Tracker  # the parent run; its run_folder holds the stages' folders
    base_dir: str
    sft_path: str
    baseline: TokenLosses

    def stage(self, mix: StageMix, init_dir: str, stage_dir: str, tracker: Tracker) -> StageRequest:
        return StageRequest(
            config=self.config,
            mix=mix,
            sft_path=self.sft_path,
            init_dir=init_dir,
            base_dir=self.base_dir,
            stage_dir=stage_dir,
            tracker=tracker,
            baseline=self.baseline,
        )

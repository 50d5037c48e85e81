"""`mixtune gc`: old runs' folders of a pipeline, and cache entries no kept run has used, go. MLflow's records
and artifacts stay (metrics, plots and registered models are read from there); so does any folder that the
champion, a running run, or a crashed run that the next start would adopt and resume still needs."""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task
from pydantic import BaseModel

from mixtune.core.cache import Entry, fingerprint, last_used, remove_entry
from mixtune.core.config import PipelineConfig
from mixtune.core.logs import run_logger
from mixtune.core.paths import cache_is_shared, cache_root, tracking_uri
from tasks.mlflow_names import Tag
from tasks.records import DiskUse, RunSummary
from tasks.registry import champion_version
from tasks.retention import folder_size, human, keep_after_run
from tasks.tracking import KILLED, RUNNING, pipeline_runs, registry_at


class PastRun(BaseModel):
    run_id: str
    folder: str
    status: str
    started: float  # seconds since the epoch
    abandoned: bool = False  # ended KILLED because its process died: the next start adopts it

    @property
    def resumable(self) -> bool:
        return self.status == RUNNING or (self.status == KILLED and self.abandoned)


class Item(BaseModel):
    path: str
    size: int
    why: str


class Collection(BaseModel):
    remove: list[Item] = []
    keep: list[Item] = []

    @property
    def freed(self) -> int:
        return sum(item.size for item in self.remove)

    def lines(self, dry_run: bool) -> list[str]:
        verb = "would remove" if dry_run else "removed"
        out = [f"keep {item.path}: {item.why}" for item in self.keep]
        out += [f"{verb} {item.path} ({human(item.size)}): {item.why}" for item in self.remove]
        out.append(f"{'would free' if dry_run else 'freed'} {human(self.freed)}")
        return out


def choose_runs(runs: list[PastRun], keep_last: int, champions: set[str]) -> tuple[list[PastRun], dict[str, str]]:
    """(runs whose folders go, why each kept one stays): pure, so the rule is testable on its own."""
    newest = sorted(runs, key=lambda r: r.started, reverse=True)
    kept: dict[str, str] = {}
    for rank, run in enumerate(newest):
        if rank < keep_last:
            kept[run.run_id] = f"one of the last {keep_last} runs"
        elif run.run_id in champions:
            kept[run.run_id] = "its model is the champion"
        elif run.resumable:
            kept[run.run_id] = f"{run.status}: running, or resumed by the next start"
    return [r for r in newest if r.run_id not in kept], kept


def past_runs(config: PipelineConfig) -> list[PastRun]:
    """The pipeline's parent runs (this run.name in this output_dir) that name a folder."""
    home = (Path(config.run.output_dir) / config.run.name).resolve()
    found = []
    for run in pipeline_runs(tracking_uri(config), config.tracking.experiment):
        folder = run.data.tags.get(Tag.RUN_FOLDER)
        if folder and Path(folder).resolve().parent == home:
            found.append(
                PastRun(
                    run_id=run.info.run_id,
                    folder=folder,
                    status=run.info.status,
                    started=run.info.start_time / 1000,
                    abandoned=run.data.tags.get(Tag.ABANDONED) == "true",
                )
            )
    return found


def champions(config: PipelineConfig) -> list:
    """The versions that hold the alias in the pipeline's registered models (the base name, and the
    `<name>-<digest>` ones a changed validation set makes)."""
    registry = registry_at(tracking_uri(config))
    names = registry.model_names(config.registered_model)
    holders = [champion_version(registry, name, config.registry.alias) for name in names]
    return [v for v in holders if v is not None]


def stale_caches(cache_root: Path, since: float, protected: set[str]) -> list[Path]:
    """Entries no run has used since `since` (when the oldest kept run started)."""
    if not cache_root.is_dir():
        return []
    entries = [p for p in cache_root.iterdir() if p.is_dir() and p.name not in protected]
    return sorted(p for p in entries if last_used(p) < since)


def plan_collection(config: PipelineConfig, keep_last: int) -> tuple[Collection, list[Path]]:
    runs, holders = past_runs(config), champions(config)
    doomed, kept = choose_runs(runs, keep_last, {v.run_id for v in holders})
    collection = Collection(
        remove=[
            Item(path=r.folder, size=folder_size(Path(r.folder)), why=f"an older run ({r.status})") for r in doomed
        ],
        keep=[Item(path=r.folder, size=0, why=kept[r.run_id]) for r in runs if r.run_id in kept],
    )
    if not kept:
        return collection, []  # no kept run to date "last used" against
    since = min(r.started for r in runs if r.run_id in kept)
    protected = {f"{Entry.CHAMPION.value}-{fingerprint(v.name, v.version, v.run_id)}" for v in holders}
    # A shared cache also holds what other pipelines' kept runs use, which this pipeline's runs cannot tell.
    caches = [] if cache_is_shared() else stale_caches(cache_root(config.run.output_dir), since, protected)
    collection.remove += [Item(path=str(p), size=folder_size(p), why="cache no kept run used") for p in caches]
    return collection, caches


def collect(config: PipelineConfig, keep_last: int, dry_run: bool = False) -> Collection:
    """Remove what plan_collection chose (nothing when `dry_run`); a cache entry in use now stays."""
    collection, caches = plan_collection(config, keep_last)
    if dry_run:
        return collection
    busy = [str(p) for p in caches if not remove_entry(p)]
    for item in collection.remove:
        if item.path not in {str(p) for p in caches}:
            shutil.rmtree(item.path, ignore_errors=True)
    collection.keep += [Item(path=p, size=0, why="in use by a run now") for p in busy]
    collection.remove = [item for item in collection.remove if item.path not in busy]
    return collection


def shared_folders(config: PipelineConfig) -> dict[str, Path]:
    """Folders a run shares with the pipeline's other runs, inside its output folder."""
    root = Path(config.run.output_dir)
    return {"caches": cache_root(config.run.output_dir), "MLflow artifacts": root / "mlartifacts"}


def leave_on_disk(config: PipelineConfig, run_folder: Path, summary: RunSummary) -> DiskUse:
    """After the run: keep what run.keep says, then (run.retention) collect older runs; measure what is left."""
    freed = keep_after_run(run_folder, config.run.keep, summary.final_model)
    collected = Collection()
    if config.run.retention:
        try:
            collected = collect(config, config.run.retention)
        except Exception as err:  # the run has finished and holds its verdict: cleaning up must not fail it
            run_logger().warning("run.retention: older runs were not collected (%s: %s)", type(err).__name__, err)
    shared = {name: folder for name, folder in shared_folders(config).items() if folder.is_dir()}
    return DiskUse(
        run_folder=str(run_folder),
        run_bytes=folder_size(run_folder),
        freed=freed,
        shared={f"{name} in {folder}": folder_size(folder) for name, folder in shared.items()},
        collected=collected.freed,
        collected_items=len(collected.remove),
    )


@task(name="retention", task_run_name="keep what the run needs")
def retention_task(config: PipelineConfig, run_folder: str, summary: RunSummary) -> RunSummary:
    return summary.model_copy(update={"disk": leave_on_disk(config, Path(run_folder), summary)})

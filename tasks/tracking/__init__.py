"""The one MLflow seam: a parent run per flow run, a nested run per stage, found again by tag on a retry; the
model registry; the searches `mixtune compare`, `mixtune gc`, the skip check and the benchmarks read.

The flow holds a `Tracker` for its parent run and hands stages a `Tracker` for their own run; nothing else
talks to MLflow (tests/test_layers.py holds every other module to that), and the MlflowClient stays inside
this package. Everything goes through MlflowClient with explicit run ids: `mlflow.active_run()` is thread-local
and Prefect runs tasks in worker threads, so the fluent API would lose track of the runs. No Prefect here: its
task wrappers are in tasks/tracking_tasks.py.
"""

from tasks.tracking.locks import hold_lock, leave_status, lock_path, owner_is_gone, release_lock
from tasks.tracking.parent import (
    end_runs_of_flow_run,
    find_experiment,
    open_experiment,
    registry_at,
    source_tags,
    start_parent_run,
)
from tasks.tracking.registry import alias_run_id
from tasks.tracking.runs import Experiment, SilentTracker, Tracker
from tasks.tracking.store import (
    FINISHED,
    KILLED,
    RUNNING,
    metric_curves,
    metric_name,
    open_store,
    pipeline_runs,
    run_url,
    runs_page,
    ui_url,
)

__all__ = [
    "FINISHED",
    "KILLED",
    "RUNNING",
    "Experiment",
    "SilentTracker",
    "Tracker",
    "alias_run_id",
    "end_runs_of_flow_run",
    "find_experiment",
    "hold_lock",
    "leave_status",
    "lock_path",
    "metric_curves",
    "metric_name",
    "open_experiment",
    "open_store",
    "owner_is_gone",
    "pipeline_runs",
    "registry_at",
    "release_lock",
    "run_url",
    "runs_page",
    "source_tags",
    "start_parent_run",
    "ui_url",
]

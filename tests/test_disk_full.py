"""A full disk while checkpointing: one `mixtune:` line naming the folder and the space needed, the checkpoints
the stage can no longer use freed, MLflow runs ended FAILED (or left for the next run to adopt when the store
cannot be written), and lock files that always hold a status. The full disk is a patched write raising ENOSPC."""

import errno
import logging
import logging.handlers
import os
import re
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

# Imported before any test starts: Prefect configures logging on its first import, which drops the handler
# caplog has put on the root logger when that import happens inside a test (alone, the store test saw nothing).
import flows.finetune as flow_module
from mixtune.core.disk import DiskFull, space_for
from tests.conftest import ready_mlflow, tiny_config

NO_SPACE = "Error while serializing: I/O error: No space left on device (os error 28)"


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), RuntimeError(NO_SPACE), OSError(errno.EDQUOT, "quota")],
)
def test_a_full_disk_is_one_message_naming_the_folder_and_the_space_needed(tmp_path, error):
    guard = space_for(tmp_path / "checkpoints", "a checkpoint", 3 * 2**20, lambda: 2**20)
    with pytest.raises(DiskFull) as raised, guard:
        raise error
    message = str(raised.value)
    assert message.startswith(f"disk full while writing a checkpoint in {tmp_path / 'checkpoints'}: it needs about 3.0")
    assert "(after removing 1.0 MB of set-aside checkpoints)" in message and "run again" in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__  # no chained traceback


@pytest.mark.parametrize(
    "torch_says",
    [
        "PytorchStreamWriter failed writing file data/0: file write failed",
        "[enforce fail at inline_container.cc:672] . unexpected pos 267392 vs 267280",  # a short write, on a tmpfs
    ],
)
def test_torchs_failed_writes_count_as_a_full_disk_only_when_space_is_short(tmp_path, torch_says):
    with pytest.raises(DiskFull), space_for(tmp_path, "a checkpoint", 2**62):
        raise RuntimeError(torch_says)
    with pytest.raises(RuntimeError, match=re.escape(torch_says)), space_for(tmp_path, "a checkpoint", 1):
        raise RuntimeError(torch_says)


def test_other_errors_pass_through(tmp_path):
    with pytest.raises(ValueError), space_for(tmp_path, "a checkpoint", 1):
        raise ValueError("not about space")


def test_on_a_full_disk_unsealed_and_set_aside_checkpoints_are_freed_and_sealed_ones_kept(tmp_path):
    from tasks.checkpoints import MANIFEST, free_checkpoint_space, make_room

    checkpoints, aside = tmp_path / "checkpoints", tmp_path / "set-aside"
    for folder in (checkpoints / "checkpoint-5", checkpoints / "checkpoint-10", aside / "checkpoint-15-x"):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"\0" * 1000)
    (checkpoints / "checkpoint-5" / MANIFEST).write_text("{}")
    make_room(checkpoints, aside, needed=1, warn=lambda *a: None)  # room enough: nothing removed
    assert (aside / "checkpoint-15-x").is_dir()
    removed = []
    assert free_checkpoint_space(checkpoints, aside, lambda *a: removed.append(a[1])) == 2000
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-5"]
    assert list(aside.iterdir()) == [] and len(removed) == 2


def test_a_full_disk_met_by_a_stages_mix_is_one_message_and_frees_the_stages_set_aside_checkpoints(
    tmp_path, monkeypatch
):
    import pandas as pd

    from tasks.mix import mix_stage
    from tests.test_mix import pool

    stage = tmp_path / "stage-2"
    (stage / "set-aside" / "checkpoint-4-x").mkdir(parents=True)
    (stage / "set-aside" / "checkpoint-4-x" / "model.safetensors").write_bytes(b"\0" * 2**20)

    def pyarrow_full(*args, **kwargs):  # how pyarrow says it: errno 28, no file name
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", pyarrow_full)
    with pytest.raises(DiskFull) as raised:
        mix_stage(pool(50, 500), 2, 0.2, 100, seed=0, manifest=str(stage / "mix.parquet"))
    assert re.match(
        rf"disk full while writing the stage's mix in {re.escape(str(stage))}: it needs about [\d.]+ KB",
        str(raised.value),
    )
    assert "(after removing 1.0 MB of set-aside checkpoints)" in str(raised.value)
    assert list((stage / "set-aside").iterdir()) == []


def test_a_lock_file_always_holds_a_status_even_when_the_disk_is_full(tmp_path, monkeypatch):
    from tasks.tracking import hold_lock, leave_status, lock_path, owner_is_gone, release_lock

    config = tiny_config(tmp_path)
    lock = lock_path(config, "flow-full")
    hold_lock("run-full", lock)
    assert lock.read_text() == "RUNNING" and not owner_is_gone(str(lock))
    monkeypatch.setattr(Path, "write_text", no_space)
    assert leave_status(config, "flow-full", "FAILED") is False
    assert lock.read_text() == "RUNNING"  # not an empty file
    assert [p.name for p in lock.parent.iterdir()] == [lock.name]  # no staging file left
    monkeypatch.undo()
    assert leave_status(config, "flow-full", "FAILED") is True
    assert lock.read_text() == "FAILED" and owner_is_gone(str(lock))  # the run is over: the next start may end it
    release_lock("run-full")


def test_a_tracking_store_that_cannot_be_written_is_said_and_its_runs_left_to_be_adopted(tmp_path, monkeypatch, caplog):
    from tasks.tracking import hold_lock, lock_path, release_lock

    config = tiny_config(tmp_path)
    hold_lock("run-store", lock_path(config, "flow-store"))

    def store_full(*args):
        raise RuntimeError("(sqlite3.OperationalError) database or disk is full")

    monkeypatch.setattr(flow_module, "end_runs_of_flow_run", store_full)
    monkeypatch.setattr(Path, "write_text", no_space)
    flow_run = SimpleNamespace(id="flow-store", deployment_id=None, parameters={"config": config.model_dump()})
    with caplog.at_level(logging.WARNING, logger="mixtune"):
        failed = SimpleNamespace(is_crashed=lambda: False)
        flow_module.end_tracking("FAILED")(None, flow_run, failed)  # must not raise
    assert "could not end the MLflow runs of flow run flow-store FAILED: the tracking store is not writable" in (
        caplog.text
    )
    assert "database or disk is full" in caplog.text and "adopts them, as after a kill" in caplog.text
    assert lock_path(config, "flow-store").read_text() == "RUNNING"
    release_lock("run-store")


def sqlite_full(monkeypatch) -> None:
    """SQLite's own "database or disk is full" on every write, raised where SQLAlchemy calls the sqlite3 driver,
    so MLflow wraps it as it would (sqlite3.OperationalError -> sqlalchemy OperationalError -> MlflowException)."""
    from sqlalchemy.engine.default import DefaultDialect

    for name in ("do_execute", "do_executemany", "do_execute_no_params"):
        original = getattr(DefaultDialect, name)

        def refuse_writes(self, cursor, statement, *args, _original=original, **kwargs):
            if statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
                raise sqlite3.OperationalError("database or disk is full")
            return _original(self, cursor, statement, *args, **kwargs)

        monkeypatch.setattr(DefaultDialect, name, refuse_writes)


def test_a_full_tracking_store_is_one_message_naming_its_folder_whichever_write_meets_it(
    tmp_path, monkeypatch, mlflow_template
):
    from mlflow.exceptions import MlflowException

    from tasks.tracking import Tracker
    from tasks.tracking.store import client_for

    uri = f"sqlite:///{ready_mlflow(tmp_path / 'store', mlflow_template) / 'mlflow.db'}"
    client = client_for(uri)
    experiment = client.create_experiment("full", artifact_location=(tmp_path / "artifacts").as_uri())
    tracker = Tracker(uri=uri, experiment_id=experiment, parent_run_id=client.create_run(experiment).info.run_id)
    mlflow_said = logging.handlers.BufferingHandler(capacity=100)
    monkeypatch.setattr(logging.getLogger("mlflow.store.db.utils"), "handlers", [mlflow_said])
    sqlite_full(monkeypatch)
    for write in (lambda: tracker.log_params({"lr": 1e-3}), lambda: tracker.end("FAILED")):
        with pytest.raises(DiskFull) as raised:
            write()
        message = str(raised.value)
        assert message.startswith(f"disk full while writing to the MLflow tracking store in {tmp_path / 'store'}: ")
        assert re.search(r" [\d.,]+ [KM]B free there; free some space there and run again", message)
        assert raised.value.__cause__ is None and raised.value.__suppress_context__  # no chained traceback
    with pytest.raises(MlflowException):  # not about space: MLflow's own error
        tracker.run("no-such-run")
    assert mlflow_said.buffer == []  # MLflow's own ERROR record with the SQL and its traceback: left out
    monkeypatch.undo()
    tracker.log_params({"lr": 1e-3})
    assert tracker.run(tracker.run_id).data.params == {"lr": "0.001"}


def test_a_full_tracking_server_or_artifact_folder_is_named(tmp_path):
    from tasks.tracking.store import store_full

    server = store_full("http://worker:s3cret@127.0.0.1:5000", RuntimeError("INTERNAL_ERROR: database or disk is full"))
    assert server.startswith("the MLflow tracking store http://worker:***@127.0.0.1:5000 says its disk is full")
    artifact = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "artifacts" / "model.safetensors"))
    said = store_full(f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}", artifact)
    assert said.startswith(f"disk full while writing to the MLflow tracking store in {tmp_path / 'artifacts'}: ")


@pytest.mark.e2e
@pytest.mark.usefixtures("shared_cache", "mlflow_db")
def test_disk_full_while_checkpointing_fails_the_run_cleanly(prefect_harness, tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils
    from mlflow.tracking import MlflowClient

    from flows.finetune import finetune
    from mixtune.cli import run_failed
    from tasks.mlflow_names import Tag

    original = transformers.modeling_utils.safe_save_file

    def full_in_stage_checkpoints(tensors, filename, *args, **kwargs):
        if "stage-1" in str(filename) and "checkpoints" in str(filename):
            raise RuntimeError(NO_SPACE)  # how safetensors says it (SafetensorError)
        return original(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_in_stage_checkpoints)
    config = tiny_config(tmp_path, schedule={"stages": 1})
    with pytest.raises(DiskFull) as raised:
        finetune(config)
    [stage] = (tmp_path / "test").glob("*/stage-1")
    assert str(stage / "checkpoints") in str(raised.value)
    assert not list((stage / "checkpoints").glob("checkpoint-*"))  # the one cut off mid-write is freed

    capsys.readouterr()
    assert run_failed(config, raised.value) == 1
    said = capsys.readouterr().err
    assert said.startswith(f"mixtune: disk full while writing a checkpoint in {stage / 'checkpoints'}: it needs about")
    assert said.count("\n") == 1 and "Traceback" not in said

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mixtune").experiment_id])
    assert {r.info.status for r in runs} == {"FAILED"} and len(runs) == 2  # the parent and stage 1
    flow_run_id = next(r.data.tags[Tag.FLOW_RUN] for r in runs if Tag.FLOW_RUN in r.data.tags)
    assert (tmp_path / "locks" / f"{flow_run_id}.lock").read_text() == "RUNNING"

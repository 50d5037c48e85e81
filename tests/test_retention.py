"""What runs keep on disk: checkpoints within a stage, stage folders after a run, older runs and caches across
runs (`mixtune gc`), and the refusal to start a run the free disk cannot hold."""

import os
import shutil
import time
from collections import namedtuple
from pathlib import Path

import pytest
import yaml

from mixtune.core.cache import LAST_USED, Entry, building, entry_dir, mark_complete
from mixtune.core.paths import SHARED_CACHE_ENV
from tasks.checkpoints import seal
from tasks.collect import PastRun, choose_runs, plan_collection, shared_folders, stale_caches
from tasks.footprint import DiskSpaceError, estimate, require_free_space
from tasks.retention import keep_after_run, prune_checkpoints, release_stage
from tests.conftest import tiny_config, tiny_raw_config


def sealed(folder: Path, name: str = "weights.bin") -> Path:
    folder.mkdir(parents=True)
    (folder / name).write_bytes(b"x" * 100)
    (folder / "config.json").write_text("{}")
    seal(folder)
    return folder


def test_a_stage_keeps_its_newest_checkpoints_and_its_best(tmp_path):
    for step in (5, 10, 15, 20):
        sealed(tmp_path / f"checkpoint-{step}", "optimizer.json")
    gone = prune_checkpoints(tmp_path, keep=1, best=str(tmp_path / "checkpoint-10"))
    assert sorted(p.name for p in gone) == ["checkpoint-15", "checkpoint-5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-20"]
    prune_checkpoints(tmp_path, keep=2, best=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-20"]


def test_a_stage_releases_its_checkpoints_only_when_its_final_verifies(tmp_path):
    stage = tmp_path / "stage-1"
    sealed(stage / "checkpoints" / "checkpoint-5", "optimizer.json")
    final = sealed(stage / "final")
    (final / "config.json").write_text('{"damaged": true}')
    assert release_stage(stage) == 0 and (stage / "checkpoints").is_dir()
    seal(final)
    assert release_stage(stage) > 0 and not (stage / "checkpoints").exists()


def fake_run(folder: Path, stages: int = 3) -> Path:
    for n in range(1, stages + 1):
        stage = folder / f"stage-{n}"
        sealed(stage / "final")
        sealed(stage / "checkpoints" / "checkpoint-10", "optimizer.json")
        (stage / "report.json").write_text("{}")
        (stage / "loss_curves.png").write_bytes(b"png")
    (folder / "plots").mkdir()
    return folder


@pytest.mark.parametrize(
    "keep, finals",
    [
        ("delivered", ["stage-2"]),
        ("stages", ["stage-1", "stage-2", "stage-3"]),
        ("all", ["stage-1", "stage-2", "stage-3"]),
    ],
)
def test_a_finished_run_keeps_what_run_keep_says(tmp_path, keep, finals):
    run = fake_run(tmp_path / "run")
    keep_after_run(run, keep, str(run / "stage-2" / "final"))
    assert sorted(p.parent.name for p in run.glob("stage-*/final")) == finals
    assert bool(list(run.rglob("optimizer.json"))) == (keep == "all")
    assert len(list(run.glob("stage-*/report.json"))) == 3 and (run / "plots").is_dir()


def past(run_id: str, started: float, status: str = "FINISHED", abandoned: bool = False) -> PastRun:
    return PastRun(run_id=run_id, folder=f"/runs/p/{run_id}", status=status, started=started, abandoned=abandoned)


def test_gc_keeps_the_last_runs_the_champion_and_what_may_resume():
    runs = [
        past("champion", 1),
        past("old", 2),
        past("crashed", 3, "RUNNING"),
        past("killed", 4, "KILLED", abandoned=True),
        past("failed", 5, "FAILED"),
        past("last", 6),
    ]
    doomed, kept = choose_runs(runs, keep_last=1, champions={"champion"})
    assert sorted(r.run_id for r in doomed) == ["failed", "old"]
    assert sorted(kept) == ["champion", "crashed", "killed", "last"]


def test_caches_go_by_last_use_not_by_age(tmp_path):
    old_but_used, new_unused = tmp_path / "cache" / "tokens-a", tmp_path / "cache" / "ingest-b"
    for folder in (old_but_used, new_unused):
        folder.mkdir(parents=True)
        (folder / "data").write_text("x")
        mark_complete(folder)
    long_ago = time.time() - 86_400
    for path in [old_but_used, *old_but_used.iterdir()]:
        os.utime(path, (long_ago, long_ago))
    with building(old_but_used) as build:  # a cache hit marks the entry used
        assert not build
    assert (old_but_used / LAST_USED).is_file()
    os.utime(new_unused / "_complete", (long_ago + 60, long_ago + 60))
    os.utime(new_unused, (long_ago + 60, long_ago + 60))
    assert stale_caches(tmp_path / "cache", since=time.time() - 3600, protected=set()) == [new_unused]


Usage = namedtuple("Usage", "total used free")


def test_the_estimate_names_weights_optimizer_state_and_logged_models(tmp_path):
    config = tiny_config(tmp_path)
    need = estimate(config, parameters=1_000_000, trained=1_000_000, pretrains=False)
    assert need.parts["stage final models"] == 3 * 4_000_000  # fp32 weights per stage
    assert need.parts["checkpoints (weights + optimizer state)"] == 3 * 12_000_000  # kept, best, being written
    assert need.parts["logged models (MLflow)"] == 3 * 4_000_000 + 2 * 4_000_000
    fewer = tiny_config(tmp_path, run={"keep": "delivered"}, train={"keep_checkpoints": 3})
    assert estimate(fewer, 1_000_000, 1_000_000, False).total > need.total


def test_a_run_the_free_disk_cannot_hold_is_refused_naming_the_folder(tmp_path, monkeypatch):
    need = estimate(tiny_config(tmp_path), 1_000_000, 1_000_000, pretrains=True)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12, need.total - 1))
    with pytest.raises(DiskSpaceError, match=str(tmp_path)):
        require_free_space(need)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 0, need.total))
    require_free_space(need)


@pytest.mark.integration  # the CLI's run command in-process: imports the whole flow (about 10 s on 2 cores)
def test_mixtune_run_refuses_before_any_work(tmp_path, monkeypatch, capsys):
    from mixtune import cli

    output = tmp_path / "runs"
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(tiny_raw_config(output)))
    monkeypatch.setattr("tasks.inputs.skip_if_unchanged", lambda config: None)
    monkeypatch.setattr(cli, "start_temporary_prefect_server", lambda: pytest.fail)  # its wait: never reached
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: Usage(10**9, 10**9, 999))
    assert cli.main(["run", str(path)]) == 2
    message = capsys.readouterr().err
    assert f"in {output} (" in message and "999 B is free" in message
    assert not output.exists()  # nothing ingested, trained or written


def test_the_estimate_reads_the_model_it_would_train(tmp_path):
    from transformers import AutoModelForCausalLM

    from tasks.base_model import disk_need, parameter_counts
    from tests.conftest import tiny_hf_model

    model = tiny_hf_model(tmp_path / "model")
    config = tiny_config(tmp_path, model={"path": str(model)}, pretrain={"enabled": False})
    loaded = AutoModelForCausalLM.from_pretrained(model)
    total, trained = parameter_counts(config)
    assert total == sum(p.numel() for p in loaded.parameters()) and trained == total  # full SFT trains them all
    assert disk_need(config).parts["stage final models"] == 3 * 4 * total


def registered_runs(output: Path, config) -> list[str]:
    """Three finished runs of the pipeline (oldest first), the oldest holding the champion alias."""
    from mlflow.tracking import MlflowClient

    from mixtune.core.paths import tracking_uri
    from tasks.mlflow_names import Tag

    client = MlflowClient(tracking_uri(config))
    exp_id = client.create_experiment(config.tracking.experiment)
    now_ms, ids = int(time.time() * 1000), []
    for days_ago in (3, 2, 1):
        run = client.create_run(exp_id, start_time=now_ms - days_ago * 86_400_000, tags={Tag.KIND.value: "pipeline"})
        folder = fake_run(output / config.run.name / run.info.run_id)
        client.set_tag(run.info.run_id, Tag.RUN_FOLDER.value, str(folder))
        client.set_terminated(run.info.run_id, "FINISHED")
        ids.append(run.info.run_id)
    client.create_registered_model(config.registered_model)
    version = client.create_model_version(config.registered_model, f"runs:/{ids[0]}/mlflow_model", run_id=ids[0])
    client.set_registered_model_alias(config.registered_model, config.registry.alias, version.version)
    return ids


def test_a_shared_cache_serves_every_output_folder_and_gc_leaves_it(tmp_path, monkeypatch):
    config = tiny_config(tmp_path / "runs")
    registered_runs(tmp_path / "runs", config)
    unused = cache_entry(tmp_path / "runs", "tokens-old", days_ago=4)
    assert plan_collection(config, keep_last=1)[1] == [unused]
    monkeypatch.setenv(SHARED_CACHE_ENV, str(tmp_path / "shared"))
    assert entry_dir(str(tmp_path / "elsewhere"), Entry.BASELINE, "k") == tmp_path / "shared" / "baseline-k"
    assert shared_folders(config)["caches"] == tmp_path / "shared"
    assert plan_collection(config, keep_last=1)[1] == []  # other pipelines' kept runs may use any shared entry


def cache_entry(output: Path, name: str, days_ago: float) -> Path:
    folder = output / "cache" / name
    folder.mkdir(parents=True)
    (folder / "data").write_text("x" * 1000)
    mark_complete(folder)
    used = time.time() - days_ago * 86_400
    for path in [folder, *folder.iterdir()]:
        os.utime(path, (used, used))
    return folder


@pytest.mark.integration
def test_mixtune_gc_keeps_the_last_run_and_the_champions(tmp_path):
    import subprocess
    import sys

    output, path = tmp_path / "runs", tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(tiny_raw_config(output)))
    champion, older, last = registered_runs(output, tiny_config(output))
    unused, used = cache_entry(output, "tokens-old", days_ago=4), cache_entry(output, "ingest-used", days_ago=0.1)
    outputs = lambda: sorted([*(output / "test").rglob("*"), *(output / "cache").rglob("*")])  # noqa: E731
    every_file = outputs()

    def gc(*flags: str) -> str:
        command = [sys.executable, "-m", "mixtune.cli", "gc", str(path), "--keep-last", "1", *flags]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout

    printed = gc("--dry-run")
    assert outputs() == every_file  # a dry run deletes nothing
    assert f"would remove {output / 'test' / older}" in printed and f"would remove {unused}" in printed
    assert "would free" in printed

    printed = gc()
    assert sorted(p.name for p in (output / "test").iterdir()) == sorted([champion, last])
    assert f"keep {output / 'test' / champion}: its model is the champion" in printed
    assert not unused.exists() and used.is_dir()
    assert "freed " in printed


@pytest.mark.e2e
def test_a_default_run_leaves_one_final_and_no_optimizer_state(prefect_harness, tmp_path):
    from flows.finetune import finetune
    from mixtune.cli import format_summary

    config = tiny_config(tmp_path)
    summary = finetune(config)
    output = Path(config.run.output_dir)
    assert [p.parent.name for p in output.rglob("final")] == [f"stage-{summary.final_stage}"]
    assert list(output.rglob("optimizer.pt")) == [] and list(output.rglob("checkpoint-*")) == []
    assert len(list(output.glob("test/*/stage-*/report.json"))) == 3 and list(output.glob("test/*/plots/*.png"))
    printed = format_summary(summary, 1.0)
    assert "left on disk: " in printed and summary.disk.run_folder in printed and "by run.keep" in printed

"""Bounded inputs: configs whose parsing could run away, rows too large to tokenise, sources that change
while they are read, and validation sets too small to measure anything."""

import json
import pickle
import subprocess
import sys

import pytest
import yaml

from mixtune.core.config import MAX_CONFIG_BYTES, ConfigError, load_config
from tasks.mlflow_names import Tag
from tests.conftest import ONE_STEP

BOMB = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
)
LOAD_AND_REPORT_RSS = """
import sys, time
from mixtune.core.config import ConfigError, load_config
start = time.perf_counter()
try:
    load_config(sys.argv[1], sys.argv[2:])
except ConfigError as err:
    print(err, file=sys.stderr)
# VmHWM, not ru_maxrss: the latter keeps the peak of the pytest process this one was forked from
peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(time.perf_counter() - start, peak_kb // 1024)
"""


def load_in_subprocess(path, overrides=()) -> tuple[float, int, str]:
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_REPORT_RSS, str(path), *overrides], capture_output=True, text=True, timeout=120
    )
    seconds, rss_mb = done.stdout.split()
    return float(seconds), int(rss_mb), done.stderr


def test_a_yaml_alias_bomb_as_a_whole_file_is_refused_fast_in_bounded_memory(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB + "\n")  # 9^9 = 387 million strings when expanded
    seconds, rss_mb, message = load_in_subprocess(bomb)
    assert str(bomb) in message and "aliases expand to more than" in message
    # Measured about 0.01 s; the bound is loose because the machine is shared.
    assert seconds < 5
    assert rss_mb < 500  # the interpreter and pydantic; safe_load grew past 2 GB on this file


def test_a_yaml_alias_bomb_in_one_field_is_refused(tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(
        "run:\n  name: x\n  output_dir: " + str(tmp_path) + "\nrecipe:\n" + "  " + BOMB.replace("\n", "\n  ") + "\n"
    )
    with pytest.raises(ConfigError, match="aliases expand"):
        load_config(config)
    plain = tmp_path / "plain.yaml"
    plain.write_text("run:\n  name: x\n")
    value = "{" + BOMB.replace("\n", ", ") + "}"
    seconds, rss_mb, message = load_in_subprocess(plain, [f"run.name={value}"])
    assert "--set run.name" in message and "aliases expand" in message
    assert seconds < 5 and rss_mb < 500


def test_an_oversized_or_self_referring_config_is_refused_naming_the_file(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("run:\n  name: x\n" + "#" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match="over the 1,048,576-byte limit") as err:
        load_config(big)
    assert str(big) in str(err.value)
    loop = tmp_path / "loop.yaml"
    loop.write_text("run: &r\n  name: x\n  again: *r\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        load_config(loop)
    deep = tmp_path / "deep.yaml"
    deep.write_text("run: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(deep)


def test_ordinary_yaml_and_anchors_load_as_safe_load_does():
    from mixtune.core.config import bounded_yaml

    text = "base: &b {lr: 0.001, steps: [1, 2]}\nstage: *b\nother: {<<: *b, lr: 0.01}\n"
    assert bounded_yaml(text, "t") == yaml.safe_load(text)
    with open("pipeline.yaml") as handle:
        default = handle.read()
    assert bounded_yaml(default, "pipeline.yaml") == yaml.safe_load(default)


ROW = '{"conversations": [{"role": "user", "content": "q%d"}, {"role": "assistant", "content": "a%d"}]}\n'
INGEST_AND_REPORT_RSS = """
import json, sys
import tasks.ingest
from tasks.ingest import ingest
from tests.conftest import tiny_config
# One process: worker processes keep 2 chunks each in flight, so their memory grows with the core count
# whatever the rows; what is measured here is what one row costs.
tasks.ingest.PARALLEL_FROM_BYTES = 1 << 40
from mixtune.core.config import Source
from pathlib import Path
out = Path(sys.argv[2])
config = tiny_config(out)
config.data.sources[1] = Source(path=sys.argv[1], role="domain")
def peak_mb():  # VmHWM, not ru_maxrss: the latter keeps the peak of the pytest process this one was forked from
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) // 1024
before = peak_mb()
result = ingest(config)
after = peak_mb()
print(json.dumps({"before": before, "after": after, "stats": result.stats[sys.argv[1]].model_dump()}))
print(open(result.quarantine).read())
"""


def domain_source(tmp_path, config, path):
    from mixtune.core.config import Source

    config.data.sources[1] = Source(path=str(path), role="domain")
    return config


def ingest_in_subprocess(path, out) -> tuple[dict, str]:
    done = subprocess.run(
        [sys.executable, "-c", INGEST_AND_REPORT_RSS, str(path), str(out)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report, quarantine = done.stdout.split("\n", 1)
    return json.loads(report), quarantine


@pytest.mark.integration
def test_a_50_mb_row_is_quarantined_too_large_in_bounded_memory(tmp_path):
    rows = [ROW % (i, i) for i in range(100)]
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    small.write_text("".join(rows))
    with big.open("w") as handle:
        handle.write("".join(rows[:50]))
        handle.write('{"conversations": [{"role": "user", "content": "' + "x" * (50 << 20) + '"}]}\n')
        handle.write("".join(rows[50:]))
    without, _ = ingest_in_subprocess(small, tmp_path / "a")
    numbers, quarantine = ingest_in_subprocess(big, tmp_path / "b")
    stats = numbers["stats"]
    assert stats["rows_read"] == 101 and stats["accepted"] == 100
    assert stats["quarantined_by_reason"] == {"too_large": 1}
    row = json.loads(quarantine.splitlines()[0])
    assert row["line"] == 51 and row["file"] == str(big) and "52,428,8" in row["message"]
    # The same ingest without the row, for comparison: the row costs far less than its own size, being read
    # past in 4 MiB blocks, never held whole.
    assert numbers["after"] - without["after"] < 25, (numbers, without)
    print(f"50 MB row: peak RSS {numbers['after']} MB; without the row {without['after']} MB")


def test_too_large_rows_in_text_and_json_sources_are_quarantined(tmp_path):
    from mixtune.core.datafiles import Part
    from tasks.readers import chunks, normalise_chunk, too_large

    text = tmp_path / "docs.txt"
    text.write_text("short one\n" + "y" * 3000 + "\nshort two\n")
    spec = {"file": str(text), "role": "pretrain", "format": "text", "text_field": "text", "dedupe": "exact"}
    spec |= {"seed": 0, "max_row_bytes": 1000, "mapping": None, "reasoning": "keep", "system_prompt": None}
    spec |= {"unit": "line", "plain": True}
    batches = [normalise_chunk(c, spec) for c in chunks(Part(text, ".txt"), "line", 1000)]
    assert [b.num_rows for b, _ in batches] == [2]
    assert [(r["line"], r["reason"]) for r in batches[0][1]] == [(2, "too_large")]
    restored = pickle.loads(pickle.dumps(batches[0][1] and too_large(3000, 1000)))  # from a worker process
    assert (restored.reason, restored.args[0]) == ("too_large", "row is 3,000 bytes, over data.max_row_bytes 1,000")
    records = tmp_path / "rows.json"
    records.write_text(json.dumps([{"text": "ok"}, {"text": "z" * 3000}]))
    spec |= {"file": str(records), "unit": "record", "plain": False}
    accepted, rejected = normalise_chunk(next(chunks(Part(records, ".json"), "line", 1000)), spec)
    assert accepted.num_rows == 1 and [(r["record"], r["reason"]) for r in rejected] == [(2, "too_large")]


def test_ingest_errors_name_the_file_without_a_traceback(tmp_path):
    from tasks.ingest import IngestError, ingest
    from tests.conftest import tiny_config

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(IngestError, match="nested too deeply") as err:
        ingest(domain_source(tmp_path, tiny_config(tmp_path / "a"), deep))
    assert str(deep) in str(err.value)
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(tmp_path / "loop.jsonl")
    with pytest.raises(IngestError, match="symbolic links") as err:
        ingest(domain_source(tmp_path, tiny_config(tmp_path / "b"), loop))
    assert str(loop) in str(err.value)


def test_a_file_rewritten_during_ingest_is_refused_naming_it(tmp_path, monkeypatch):
    import tasks.ingest
    from tasks.ingest import IngestError, ingest
    from tests.conftest import tiny_config

    path = tmp_path / "domain.jsonl"
    path.write_text("".join(ROW % (i, i) for i in range(300)))
    original = tasks.ingest.source_chunks

    def rewritten_after_the_first_chunk(files, *args):
        for number, item in enumerate(original(files, *args)):
            yield item
            if number == 0 and files.parts[0].path == path:
                path.write_text("".join(ROW % (i, -i) for i in range(300)))

    monkeypatch.setattr(tasks.ingest, "source_chunks", rewritten_after_the_first_chunk)
    monkeypatch.setattr("tasks.readers.BLOCK_BYTES", 4096)  # several chunks from a small file
    config = domain_source(tmp_path, tiny_config(tmp_path / "out"), path)
    with pytest.raises(IngestError, match="changed while it was being read") as err:
        ingest(config)
    assert str(path) in str(err.value)
    monkeypatch.setattr(tasks.ingest, "source_chunks", original)
    assert ingest(config).stats[str(path)].accepted == 300  # the finished file ingests under its new hash


@pytest.mark.e2e
def test_an_empty_domain_validation_set_fails_before_training_naming_the_source(prefect_harness, tmp_path, capsys):
    from flows.finetune import finetune
    from mixtune.cli import check, run_failed
    from tasks.ingest import IngestError
    from tests.conftest import tiny_config

    path = tmp_path / "same.jsonl"
    path.write_text(ROW % (1, 1) * 1000)  # one distinct row: 999 duplicates, nothing left to hold out
    config = domain_source(tmp_path, tiny_config(tmp_path / "out"), path)
    with pytest.raises(IngestError, match="domain validation set holds 0 row") as err:
        finetune(config)
    assert f"{path}: 0 of 1 accepted" in str(err.value)
    assert not list((tmp_path / "out").glob("cache/base-*")) and not (tmp_path / "out" / "test").exists()
    capsys.readouterr()
    assert run_failed(config, err.value) == 2
    said_by_run = capsys.readouterr().err
    assert check(config) == 2  # `mixtune check` refuses it too, in the same words
    assert capsys.readouterr().err == said_by_run


def test_a_loss_over_zero_tokens_is_an_error_not_zero():
    import torch

    from tasks.lm import PadCollator, mean_token_loss
    from tasks.tables import TokenDataset

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 5)})()

    import pandas as pd

    unlabelled = TokenDataset(pd.DataFrame({"input_ids": [[1, 2, 3]], "labels": [[-100, -100, -100]]}))
    with pytest.raises(ValueError, match="holds no labelled token"):
        mean_token_loss(Constant(), unlabelled, PadCollator(0), 4)


@pytest.mark.integration
@pytest.mark.e2e
def test_two_runs_at_once_on_a_fresh_output_folder_build_each_cache_entry_once(tmp_path):
    import os
    import re

    from mlflow.tracking import MlflowClient

    from tests.conftest import tiny_raw_config
    from tests.servers import BIN, launch

    config = tmp_path / "pipeline.yaml"
    raw = tiny_raw_config(tmp_path / "runs", **ONE_STEP)
    config.write_text(yaml.safe_dump(raw))
    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    runs = [
        launch([str(BIN / "mixtune"), "run", str(config)], {**env, "PREFECT_HOME": str(tmp_path / f"home{i}")}, log)
        for i, log in enumerate([tmp_path / "a.log", tmp_path / "b.log"])
    ]
    codes = [run.wait(600) for run in runs]
    logs = (tmp_path / "a.log").read_text() + (tmp_path / "b.log").read_text()
    assert codes == [0, 0], logs[-4000:]
    built = re.findall(r"cache entry (\w+)-\w+: building", logs)
    # Each entry built once, by one of the two (the champion's download too, when the second run finds one).
    assert len(built) == len(set(built)) and {"base", "ingest", "tokenizer", "tokens"} <= set(built), built
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mixtune")
    parents = client.search_runs([experiment.experiment_id], f"tags.`{Tag.KIND}` = 'pipeline'")
    assert sorted(run.info.status for run in parents) == ["FINISHED", "FINISHED"]


@pytest.mark.e2e
@pytest.mark.usefixtures("mlflow_db")  # its own cache: the test damages it
def test_a_deleted_or_damaged_cache_entry_is_rebuilt_not_reported_cached(prefect_harness, tmp_path):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.finetune import finetune
    from mixtune.core.cache import COMPLETE_MARKER, file_digest
    from tests.conftest import tiny_config

    config = tiny_config(tmp_path, **ONE_STEP, registry={"skip_unchanged": False})
    finetune(config)
    cache = tmp_path / "cache"
    (next(p for p in cache.glob("ingest-*") if p.is_dir()) / COMPLETE_MARKER).unlink()  # the marker gone
    sft = next(cache.glob("tokens-*/sft.parquet"))
    sft_digest = file_digest(sft)
    with sft.open("r+b") as handle:  # truncated
        handle.truncate(sft.stat().st_size // 2)
    weights = next(cache.glob("base-*/model.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit flipped in the middle of the weights
    weights.write_bytes(bytes(data))

    second = finetune(config)
    flow_run_id = MlflowClient(second.tracking_uri).get_run(second.parent_run_id).data.tags[Tag.FLOW_RUN]
    with get_client(sync_client=True) as prefect:
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states = {run.name: run.state.name for run in task_runs}
    assert states["ingest"] == states["tokenize"] == states["pretrain"] == "Completed", states
    assert states["tokenizer"] == "Cached", states  # untouched: still reused
    assert file_digest(sft) == sft_digest  # rebuilt whole, the same content as before the damage
    assert (next(p for p in cache.glob("ingest-*") if p.is_dir()) / COMPLETE_MARKER).is_file()


@pytest.mark.usefixtures("mlflow_db")
def test_runs_that_failed_while_the_server_was_down_end_failed_at_the_next_start(tmp_path):
    from tasks.tracking import Experiment, leave_status, release_lock, start_parent_run
    from tests.conftest import tiny_config

    config = tiny_config(tmp_path)
    first = start_parent_run(config, "flow-a")
    leave_status(config, "flow-a", "FAILED")  # what the failure hook does when it cannot reach the server
    release_lock(first.parent_run_id)  # its process is gone
    killed = start_parent_run(config, "flow-b")
    release_lock(killed.parent_run_id)  # gone too, with no word left: SIGKILL
    start_parent_run(config, "flow-c")
    experiment = Experiment(uri=first.uri, experiment_id=first.experiment_id)
    assert experiment.run(first.parent_run_id).info.status == "FAILED"
    assert experiment.run(killed.parent_run_id).info.status == "KILLED"


@pytest.mark.usefixtures("mlflow_db")
def test_a_version_whose_run_did_not_finish_is_no_champion_and_no_reason_to_skip(tmp_path):
    from tasks.inputs import input_hash, unchanged_since
    from tasks.registry import champion_version, register_version
    from tasks.tracking import start_parent_run
    from tests.conftest import tiny_config, tiny_hf_model

    config = tiny_config(tmp_path)
    earner = start_parent_run(config, "flow-a")
    earner.set_tags({Tag.INPUT_HASH: input_hash(config), Tag.REGISTERED_MODEL: config.registered_model})
    model = tiny_hf_model(tmp_path / "model")
    earner.log_artifacts(model, "final_model")
    version = register_version(earner, config.registered_model, str(model), "final_model", {}, "an old run's model")
    earner.move_alias(config.registered_model, config.registry.alias, version)  # as an old run did, then died
    earner.end("KILLED")
    later = start_parent_run(config, "flow-b")
    assert champion_version(later, config.registered_model, config.registry.alias) is None
    assert (
        unchanged_since(config, later, input_hash(config)) is None
    )  # same inputs, but the run that had them was KILLED
    earner.end("FINISHED")
    assert int(champion_version(later, config.registered_model, config.registry.alias).version) == version
    assert unchanged_since(config, later, input_hash(config)) == earner.parent_run_id


@pytest.mark.integration
@pytest.mark.e2e
def test_a_tracking_server_that_goes_down_fails_the_run_within_the_bound_with_one_message(tmp_path):
    """The server answers the two reachability checks (the CLI's and the flow's), then goes away for good."""
    import os
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tests.conftest import tiny_raw_config
    from tests.servers import BIN, QUIET_ENV

    answered = []

    class TwoAnswersThenGone(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"experiments": []}')
            answered.append(self.path)
            if len(answered) == 2:
                threading.Thread(target=lambda: (server.shutdown(), server.server_close())).start()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), TwoAnswersThenGone)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump(tiny_raw_config(tmp_path / "runs", tracking={"tracking_uri": url})))
    env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(tmp_path / "home")}
    started = time.monotonic()
    done = subprocess.run(
        [str(BIN / "mixtune"), "run", str(config)], env=env, capture_output=True, text=True, timeout=600
    )
    elapsed = time.monotonic() - started
    assert len(answered) == 2
    assert done.returncode == 1, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    message = [i for i, line in enumerate(lines) if line.startswith("mixtune: the run failed: MLflow tracking")]
    assert len(message) == 1 and url in lines[message[0]], done.stderr[-3000:]
    assert "Traceback" not in "\n".join(lines[message[0] :])
    print(f"tracking server down: the run failed after {elapsed:.0f} s")
    # MLflow's defaults took ~13 min; with mixtune's, a refused request gives up within seconds and the
    # tracking task after its three Prefect retries (2 + 5 + 15 s). Measured 211 s with Prefect's own start
    # on 2 cores at load 20; the bound is loose for that, and still far below MLflow's 13 minutes.
    assert elapsed < 420, elapsed

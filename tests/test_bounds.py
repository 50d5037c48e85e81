"""Bounded inputs: configs whose parsing could run away, rows too large to tokenise, sources that change
while they are read, and validation sets too small to measure anything."""

import json
import subprocess
import sys

import pytest
import yaml

from mixtune.core.config import MAX_CONFIG_BYTES, ConfigError, load_config

BOMB = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
)
LOAD_AND_REPORT_RSS = """
import resource, sys, time
from mixtune.core.config import ConfigError, load_config
start = time.perf_counter()
try:
    load_config(sys.argv[1], sys.argv[2:])
except ConfigError as err:
    print(err, file=sys.stderr)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
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
import json, resource, sys
from tasks.ingest import ingest
from tests.conftest import tiny_config
from mixtune.core.config import Source
from pathlib import Path
out = Path(sys.argv[2])
config = tiny_config(out)
config.data.sources[1] = Source(path=sys.argv[1], role="domain")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
result = ingest(config)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(json.dumps({"before": before, "after": after, "stats": result.stats[sys.argv[1]]}))
print(open(result.quarantine).read())
"""


def domain_source(tmp_path, config, path):
    from mixtune.core.config import Source

    config.data.sources[1] = Source(path=str(path), role="domain")
    return config


def test_a_50_mb_row_is_quarantined_too_large_in_bounded_memory(tmp_path):
    path = tmp_path / "big.jsonl"
    with path.open("w") as handle:
        for i in range(50):
            handle.write(ROW % (i, i))
        handle.write('{"conversations": [{"role": "user", "content": "' + "x" * (50 << 20) + '"}]}\n')
        for i in range(50, 100):
            handle.write(ROW % (i, i))
    done = subprocess.run(
        [sys.executable, "-c", INGEST_AND_REPORT_RSS, str(path), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report, quarantine = done.stdout.split("\n", 1)
    numbers = json.loads(report)
    stats = numbers["stats"]
    assert stats["rows_read"] == 101 and stats["accepted"] == 100
    assert stats["quarantined_by_reason"] == {"too_large": 1}
    row = json.loads(quarantine.splitlines()[0])
    assert row["line"] == 51 and row["file"] == str(path) and "52,428,8" in row["message"]
    # Peak memory grows by less than the row itself: it is read past in 4 MiB blocks, never held whole.
    assert numbers["after"] - numbers["before"] < 50, numbers


def test_too_large_rows_in_text_and_json_sources_are_quarantined(tmp_path):
    from tasks.readers import chunks, normalise_chunk

    text = tmp_path / "docs.txt"
    text.write_text("short one\n" + "y" * 3000 + "\nshort two\n")
    spec = {"file": str(text), "role": "pretrain", "format": "text", "text_field": "text", "dedupe": "exact"}
    spec |= {"seed": 0, "max_row_bytes": 1000, "mapping": None, "reasoning": "keep", "system_prompt": None}
    batches = [normalise_chunk(c, spec) for c in chunks(text, "line", 1000)]
    assert [b.num_rows for b, _ in batches] == [2]
    assert [(r["line"], r["reason"]) for r in batches[0][1]] == [(2, "too_large")]
    records = tmp_path / "rows.json"
    records.write_text(json.dumps([{"text": "ok"}, {"text": "z" * 3000}]))
    spec["file"] = str(records)
    accepted, rejected = normalise_chunk(next(chunks(records, "line", 1000)), spec)
    assert accepted.num_rows == 1 and [(r["line"], r["reason"]) for r in rejected] == [(2, "too_large")]


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
    original = tasks.ingest.chunks

    def rewritten_after_the_first_chunk(source, *args):
        for number, chunk in enumerate(original(source, *args)):
            yield chunk
            if number == 0 and source == path:
                path.write_text("".join(ROW % (i, -i) for i in range(300)))

    monkeypatch.setattr(tasks.ingest, "chunks", rewritten_after_the_first_chunk)
    monkeypatch.setattr("tasks.readers.BLOCK_BYTES", 4096)  # several chunks from a small file
    config = domain_source(tmp_path, tiny_config(tmp_path / "out"), path)
    with pytest.raises(IngestError, match="changed while it was being read") as err:
        ingest(config)
    assert str(path) in str(err.value)
    monkeypatch.setattr(tasks.ingest, "chunks", original)
    assert ingest(config).stats[str(path)]["accepted"] == 300  # the finished file ingests under its new hash


def test_an_empty_domain_validation_set_fails_before_training_naming_the_source(prefect_harness, tmp_path):
    from flows.finetune import finetune
    from tasks.ingest import IngestError
    from tests.conftest import tiny_config

    path = tmp_path / "same.jsonl"
    path.write_text(ROW % (1, 1) * 1000)  # one distinct row: 999 duplicates, nothing left to hold out
    config = domain_source(tmp_path, tiny_config(tmp_path / "out"), path)
    with pytest.raises(IngestError, match="domain validation set holds 0 row") as err:
        finetune(config)
    assert f"{path}: 0 of 1 accepted" in str(err.value)
    assert not list((tmp_path / "out").glob("cache/base-*")) and not (tmp_path / "out" / "test").exists()


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

"""`mixtune check` reads every input file: formats and quarantine counts per source, and a failure on a file
that `run` could not use."""

import json

from mixtune.cli import main
from tests.conftest import tiny_raw_config

GOOD = {"conversations": [{"role": "user", "content": "q{}"}, {"role": "assistant", "content": "a{}"}]}


def config_file(tmp_path, domain, general=None, **settings) -> str:
    import yaml

    raw = tiny_raw_config(tmp_path / "runs")
    raw["data"]["sources"][1] = {"path": str(domain), "role": "domain", **settings}
    if general is not None:
        raw["data"]["sources"][0] = {"path": str(general), "role": "general"}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_check_reports_formats_and_quarantine_counts(tmp_path, capsys):
    rows = [json.dumps(GOOD).replace("{}", str(i)) for i in range(10)]
    rows += [json.dumps({"instruction": f"i{i}", "output": f"o{i}"}) for i in range(4)]
    rows += ['{"conversations": [', json.dumps(GOOD).replace("{}", "0")]  # one broken, one duplicate
    domain = tmp_path / "domain.jsonl"
    domain.write_text("\n".join(rows) + "\n")
    assert main(["check", config_file(tmp_path, domain)]) == 0
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if line.startswith(str(domain))]
    assert "jsonl; formats minimind 11, alpaca 4;" in line
    assert "16 read, 14 accepted" in line and "1 duplicate, 1 quarantined (invalid_json 1)" in line
    assert "synthetic:general: general, jsonl; formats minimind" in out


def test_check_fails_on_an_unusable_file(tmp_path, capsys):
    domain = tmp_path / "domain.jsonl"
    domain.write_text('{"foo": 1}\n{"bar": 2}\n')
    assert main(["check", config_file(tmp_path, domain)]) == 2
    err = capsys.readouterr().err
    assert str(domain) in err and "no row in a usable format" in err


def test_check_reports_compressed_files_shard_folders_and_the_new_formats(tmp_path, capsys):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    completions = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(6)]
    domain = tmp_path / "domain.jsonl.gz"
    domain.write_bytes(gzip.compress(("\n".join(json.dumps(r) for r in completions) + "\n{\n").encode()))
    folder = tmp_path / "qa"
    folder.mkdir()
    for k in range(2):
        rows = [{"question": f"q{k}-{i}", "answer": f"a{i}"} for i in range(3)]
        pq.write_table(pa.Table.from_pylist(rows), folder / f"train-{k:05d}-of-00002.parquet")
    config = config_file(tmp_path, domain, general=folder)
    assert main(["check", config]) == 0
    out = capsys.readouterr().out
    assert f"{domain}: domain, jsonl, gzip; formats prompt_completion 6; 7 read, 6 accepted" in out
    assert "1 quarantined (invalid_json 1)" in out
    assert f"{folder}: general, parquet, 2 shards; formats pair question/answer 6; 6 read, 6 accepted" in out


def test_check_refuses_ambiguous_keys_with_the_columns_line_to_add(tmp_path, capsys):
    domain = tmp_path / "domain.jsonl"
    domain.write_text(json.dumps({"query": "q", "laws": ["l"], "response": "r"}) + "\n")
    assert main(["check", config_file(tmp_path, domain)]) == 2
    err = capsys.readouterr().err
    assert f"{domain}: no row in a usable format; line 1:" in err
    assert "add to this source columns: {prompt: query, response: response}" in err


def test_check_fails_like_run_on_a_source_whose_rows_are_all_identical(tmp_path, capsys):
    domain = tmp_path / "domain.jsonl"
    domain.write_text((json.dumps(GOOD).replace("{}", "0") + "\n") * 50)
    assert main(["check", config_file(tmp_path, domain)]) == 2
    captured = capsys.readouterr()
    assert "inputs OK" not in captured.out and "1 accepted (1 train / 0 val), 49 duplicate" in captured.out
    assert captured.err.startswith("mixtune: unusable input, nothing was trained:\n")
    assert f"domain validation set holds 0 row(s), fewer than data.min_val_samples 1 ({domain}: 0 of 1" in captured.err


def test_check_fails_when_every_row_of_a_role_is_held_out(tmp_path, capsys):
    domain = tmp_path / "domain.jsonl"
    domain.write_text(json.dumps(GOOD).replace("{}", "0") + "\n")
    assert main(["check", config_file(tmp_path, domain, val_fraction=0.9)]) == 2
    assert f"domain training set holds no row ({domain}: 0 of 1 accepted" in capsys.readouterr().err

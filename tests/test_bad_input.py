"""Bad input of every kind: each row read is accepted, a duplicate, or quarantined with a reason code;
each unusable file is an IngestError naming it. Never a crash."""

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixtune.core.config import Columns, Source
from tasks.ingest import IngestError, ingest
from tasks.records import SourceStats
from tasks.tokenize import tokenize
from tests.conftest import tiny_config

UA = [{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}]


def good(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


# (name, line as bytes, expected reason); every kind of broken row a JSONL file can hold.
BAD_JSONL_ROWS = [
    ("invalid json", b'{"messages": [', "invalid_json"),
    ("array row", b"[1, 2, 3]", "not_object"),
    ("string row", b'"just text"', "not_object"),
    ("number row", b"42", "not_object"),
    ("unknown keys", b'{"foo": 1}', "unknown_format"),
    ("messages not a list", b'{"messages": "hi"}', "missing_field"),
    ("no turns", b'{"messages": []}', "empty_conversation"),
    ("turn not object", b'{"messages": ["user: hi"]}', "bad_turn"),
    (
        "content not text",
        b'{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}',
        "missing_field",
    ),
    (
        "empty content",
        b'{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}',
        "empty_content",
    ),
    (
        "unknown role",
        b'{"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}',
        "unknown_role",
    ),
    ("no assistant", b'{"messages": [{"role": "user", "content": "q"}]}', "no_assistant"),
    ("trailing user", json.dumps({"messages": [*UA, {"role": "user", "content": "more?"}]}).encode(), "trailing_turn"),
    ("tool turn", json.dumps({"messages": [*UA[:1], {"role": "tool", "content": "{}"}, UA[1]]}).encode(), "tool_turn"),
    ("invalid utf-8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "invalid_utf8"),
    (
        "NUL character",
        json.dumps({"messages": [{"role": "user", "content": "a\x00b"}, UA[1]]}).encode(),
        "nul_character",
    ),
    (
        "control character",
        json.dumps({"messages": [{"role": "user", "content": "a\x07b"}, UA[1]]}).encode(),
        "control_character",
    ),
    (
        "sharegpt unknown speaker",
        b'{"conversations": [{"from": "alien", "value": "q"}, {"from": "gpt", "value": "a"}]}',
        "unknown_role",
    ),
    ("alpaca missing output", b'{"instruction": "q"}', "missing_field"),
    ("alpaca input not text", b'{"instruction": "q", "output": "a", "input": 3}', "wrong_type"),
    ("reasoning not text", json.dumps({"messages": [UA[0], {**UA[1], "reasoning_content": 7}]}).encode(), "wrong_type"),
]


def run_ingest(tmp_path: Path, source: Source, **data):
    config = tiny_config(tmp_path, data=data) if data else tiny_config(tmp_path)
    config.data.sources[1] = source
    result = ingest(config)
    return result, result.stats[source.label]


def assert_accounted(stats: SourceStats) -> None:
    assert stats.accepted + stats.duplicates + stats.quarantined == stats.rows_read
    assert sum(stats.quarantined_by_reason.values()) == stats.quarantined


def test_every_kind_of_bad_jsonl_row_is_quarantined_with_its_reason(tmp_path):
    lines = [json.dumps(good(i)).encode() for i in range(40)]
    for k, (_, raw, _) in enumerate(BAD_JSONL_ROWS):
        lines.insert(2 * k + 1, raw)
    lines.append(json.dumps(good(3)).encode())  # exact duplicate
    path = tmp_path / "domain.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    result, stats = run_ingest(tmp_path, Source(path=str(path), role="domain"))
    assert_accounted(stats)
    assert stats.rows_read == len(lines)
    assert (stats.accepted, stats.duplicates) == (40, 1)
    quarantined = [json.loads(line) for line in Path(result.quarantine).read_text().splitlines()]
    by_line = {q["line"]: q for q in quarantined}
    for k, (name, _, reason) in enumerate(BAD_JSONL_ROWS):
        row = by_line[2 * k + 2]
        assert row["reason"] == reason, name
        assert row["file"] == str(path) and row["message"]


def test_csv_cells_columns_and_templates(tmp_path):
    path = tmp_path / "exam.csv"
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["question", "answer", "A", "B"])
        writer.writerow(["What is 1+1?\n(two lines)", "B", "1", "2"])
        writer.writerow(["Q2", "", "x", "y"])  # empty cell
        writer.writerow(["Q3", "A", "x", "y", "extra"])  # more cells than the header
        writer.writerow(["Q4", "A"])  # missing cells
        writer.writerow(["Q5", "A", "x\x07", "y"])  # control character in a cell
    columns = Columns(prompt_template="{question}\nA. {A}\nB. {B}", response="answer")
    result, stats = run_ingest(
        tmp_path,
        Source(path=str(path), role="domain", columns=columns, system_prompt="Answer with a letter."),
        max_quarantine_fraction=0.9,
    )
    assert_accounted(stats)
    assert stats.rows_read == 5 and stats.accepted == 1
    assert stats.quarantined_by_reason == {
        "empty_content": 1,
        "bad_csv_row": 1,
        "missing_field": 1,
        "control_character": 1,
    }
    quarantined = [json.loads(line) for line in Path(result.quarantine).read_text().splitlines()]
    assert sorted(q["record"] for q in quarantined) == [2, 3, 4, 5]  # records: a quoted cell may span lines
    by_reason = {q["reason"]: q for q in quarantined}
    assert by_reason["empty_content"]["field"] == "answer (turn[2].content)"  # after the system turn
    assert json.loads(by_reason["bad_csv_row"]["row"]) == ["Q3", "A", "x", "y", "extra"]  # cells, not the message


def test_parquet_nan_and_wrong_types(tmp_path):
    path = tmp_path / "qa.parquet"
    table = pa.table({"query": ["q1", None, "q3", "q4"], "response": ["r1", "r2", None, "r4"]})
    pq.write_table(table, path)
    pq.write_table(pa.table({"query": ["q1", "q2"], "response": [1.5, float("nan")]}), tmp_path / "nums.parquet")
    _, stats = run_ingest(
        tmp_path, Source(path=str(path), role="domain", columns=Columns(prompt="query", response="response"))
    )
    assert_accounted(stats)
    assert stats.accepted == 2 and stats.quarantined_by_reason == {"missing_field": 2}
    with pytest.raises(IngestError, match="no row in a usable format"):
        run_ingest(
            tmp_path / "n",
            Source(
                path=str(tmp_path / "nums.parquet"), role="domain", columns=Columns(prompt="query", response="response")
            ),
        )


def test_near_duplicates_are_dropped_and_counted_when_asked(tmp_path):
    rows = [
        good(1),
        good(2),
        {"messages": [{"role": "user", "content": "QUESTION   1!"}, {"role": "assistant", "content": "Answer 1."}]},
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _, exact = run_ingest(tmp_path / "a", Source(path=str(path), role="domain"))
    _, near = run_ingest(tmp_path / "b", Source(path=str(path), role="domain"), dedupe="normalized")
    assert (exact.accepted, exact.duplicates) == (3, 0)
    assert (near.accepted, near.duplicates, near.near_duplicates) == (2, 1, 1)


def test_reasoning_is_kept_or_dropped(tmp_path):
    row = {"messages": [UA[0], {**UA[1], "reasoning_content": "think first"}]}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(row) + "\n")
    for mode, expected in (("keep", True), ("drop", False)):
        result, _ = run_ingest(tmp_path / mode, Source(path=str(path), role="domain"), reasoning=mode)
        messages = pq.read_table(result.samples, filters=[("tag", "==", "domain")])["messages"][0].as_py()
        assert ("think first" in messages) is expected


def test_overlong_samples_are_truncated_or_rejected_and_counted(tmp_path):
    long_answer = " ".join(["word"] * 400)
    path = tmp_path / "long.jsonl"
    path.write_text(
        "\n".join(
            json.dumps(r)
            for r in [good(1), good(2), {"messages": [UA[0], {"role": "assistant", "content": long_answer}]}]
        )
        + "\n"
    )
    from tasks.base_model import prepare_tokenizer

    for mode in ("truncate", "reject"):
        config = tiny_config(tmp_path / mode, data={"overlong": mode})
        config.data.sources[1] = Source(path=str(path), role="domain")
        data = ingest(config)
        tok = prepare_tokenizer(config, data.samples, data.key)
        tokens = tokenize(data.samples, data.key, tok, 64, config.run.output_dir, mode)
        stats = tokens.stats["sft"][str(path)]
        assert stats["over_max_seq_len"] == 1
        kept = pq.read_table(tokens.sft, filters=[("source", "==", str(path))]).num_rows
        assert kept == (3 if mode == "truncate" else 2)
        assert stats.get("too_long", 0) == (0 if mode == "truncate" else 1)


@pytest.mark.parametrize(
    "name, content, suffix, message",
    [
        ("empty file", b"", ".jsonl", "file is empty"),
        ("wrong extension", b"a,b\n", ".tsv", "unsupported extension"),
        ("all rows broken", b'{"foo": 1}\n{"bar": 2}\n', ".jsonl", "no row in a usable format"),
        ("broken .json document", b"[1, 2", ".json", "not a valid JSON document"),
        (".json not a list", b'{"rows": []}', ".json", "must hold a list"),
        ("not parquet", b"PAR1 but not really", ".parquet", "not a readable Parquet file"),
        ("csv without rows", b"", ".csv", "file is empty"),
        ("csv header only", b"question,answer\n", ".csv", "holds no rows"),
        ("only blank lines", b"\n\n  \n", ".jsonl", "holds no rows"),
        (
            "mostly garbage",
            b'{"foo": 1}\n' * 6 + (json.dumps(good(1)) + "\n").encode(),
            ".jsonl",
            "max_quarantine_fraction",
        ),
    ],
)
def test_unusable_files_are_clear_errors_naming_them(tmp_path, name, content, suffix, message):
    path = tmp_path / f"domain{suffix}"
    path.write_bytes(content)
    columns = Columns(prompt="question", response="answer") if suffix == ".csv" else None
    with pytest.raises(IngestError, match=message) as err:
        run_ingest(tmp_path, Source(path=str(path), role="domain", columns=columns))
    assert str(path) in str(err.value), name


def test_json_list_rows_are_named_by_record_not_line(tmp_path):
    path = tmp_path / "domain.json"
    rows = [good(1), good(2), {"messages": "not a list"}, good(4)]
    path.write_text(json.dumps(rows, indent=2))  # the whole list on many lines: line numbers mean nothing here
    result, stats = run_ingest(tmp_path, Source(path=str(path), role="domain"), max_quarantine_fraction=0.5)
    [row] = [json.loads(line) for line in Path(result.quarantine).read_text().splitlines()]
    assert row["record"] == 3 and "line" not in row
    assert json.loads(row["row"]) == rows[2]

    path.write_text(json.dumps([{"foo": 1}] * 3))
    with pytest.raises(IngestError, match="no row in a usable format; record 1: "):
        run_ingest(tmp_path / "again", Source(path=str(path), role="domain"))


def test_a_mapped_column_error_names_the_source_field(tmp_path):
    path = tmp_path / "domain.jsonl"
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(9)] + [{"question": "q9", "answer": "  "}]
    rows += [{"question": "bell\x07", "answer": "a10"}]
    path.write_text("".join(json.dumps(r).replace("\\\\x07", "\\u0007") + "\n" for r in rows))
    columns = Columns(prompt="question", response="answer")
    result, stats = run_ingest(tmp_path, Source(path=str(path), role="domain", columns=columns))
    assert_accounted(stats)
    empty, control = [json.loads(line) for line in Path(result.quarantine).read_text().splitlines()]
    assert (empty["line"], empty["reason"], empty["field"]) == (10, "empty_content", "answer (turn[1].content)")
    assert "field 'answer' is empty" in empty["message"]
    assert (control["reason"], control["field"]) == ("control_character", "question (turn[0].content)")


def test_directories_and_unreadable_paths_are_errors(tmp_path):
    folder = tmp_path / "data.jsonl"
    folder.mkdir()
    with pytest.raises(IngestError, match="a folder with no readable shard"):
        run_ingest(
            tmp_path,
            Source.model_construct(
                path=str(folder),
                role="domain",
                format="auto",
                columns=None,
                system_prompt=None,
                text_field="text",
                text_split="line",
                val_fraction=0.1,
                max_val_samples=200,
                synthetic=None,
                samples=1,
            ),
        )
    dangling = tmp_path / "gone.jsonl"
    dangling.symlink_to(tmp_path / "nowhere.jsonl")
    with pytest.raises(IngestError, match="cannot read"):
        run_ingest(
            tmp_path,
            Source.model_construct(
                path=str(dangling),
                role="domain",
                format="auto",
                columns=None,
                system_prompt=None,
                text_field="text",
                text_split="line",
                val_fraction=0.1,
                max_val_samples=200,
                synthetic=None,
                samples=1,
            ),
        )


def test_text_documents_by_line_or_blank_line(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes(b"para one\nstill one\n\npara two\n\n\xff broken\n")
    _, by_line = run_ingest(tmp_path / "a", Source(path=str(path), role="pretrain"))
    assert (by_line.rows_read, by_line.accepted, by_line.quarantined) == (4, 3, 1)
    _, by_block = run_ingest(tmp_path / "b", Source(path=str(path), role="pretrain", text_split="blank_line"))
    assert (by_block.rows_read, by_block.accepted, by_block.quarantined) == (3, 2, 1)


@pytest.mark.integration  # starts ingest's worker processes
def test_parallel_reading_gives_the_same_result_as_serial(tmp_path, monkeypatch):
    import tasks.ingest as ingest_module
    import tasks.readers as readers

    lines = [json.dumps(good(i % 3000)) for i in range(9000)] + ['{"broken'] * 10
    path = tmp_path / "big.jsonl"
    path.write_text("\n".join(lines) + "\n")
    _, serial = run_ingest(tmp_path / "serial", Source(path=str(path), role="domain"))
    monkeypatch.setattr(ingest_module, "PARALLEL_FROM_BYTES", 0)
    monkeypatch.setattr(readers, "BLOCK_BYTES", 100_000)
    result, parallel = run_ingest(tmp_path / "parallel", Source(path=str(path), role="domain"))
    assert parallel == serial
    assert (parallel.accepted, parallel.duplicates, parallel.quarantined) == (3000, 6000, 10)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "messages",
                    "conversations",
                    "role",
                    "content",
                    "from",
                    "value",
                    "instruction",
                    "input",
                    "output",
                    "text",
                    "reasoning_content",
                    "x",
                ]
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.one_of(st.binary(max_size=60), json_values.map(lambda v: json.dumps(v).encode())), min_size=1, max_size=25
    )
)
def test_any_bytes_or_json_keep_the_invariant(tmp_path_factory, rows):
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "fuzz.jsonl"
    lines = [r.replace(b"\n", b" ").replace(b"\r", b" ") for r in rows]
    path.write_bytes(b"\n".join([json.dumps(good(0)).encode(), *lines]) + b"\n")
    try:
        _, stats = run_ingest(folder, Source(path=str(path), role="domain"), max_quarantine_fraction=1.0)
    except IngestError as err:
        assert str(path) in str(err)
        return
    assert_accounted(stats)
    assert stats.rows_read == 1 + sum(1 for line in lines if line.strip())

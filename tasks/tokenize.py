"""Tokenise normalised samples once per (data, tokenizer, max length); every stage and re-run reuses them.

Streams the samples table batch by batch. SFT labels cover assistant answers only (see tasks/chat.py and
Encoder below for how they are found, fast and checked). Pre-training text is packed, not cut: each source's
documents are concatenated with EOS and split into max_seq_len blocks (the standard causal-LM recipe), so every
token is trained on once per epoch.
"""

from __future__ import annotations

import json
from array import array
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from transformers import AutoTokenizer

from mixtune.core.cache import Entry, building, entry_dir, file_digest, fingerprint, mark_complete, prefect_cache_key
from mixtune.core.logs import run_logger
from tasks.chat import BOS, CHATML, EOS, pieces_for
from tasks.records import TokenizedData
from tasks.tables import IGNORE

TOKENIZE_VERSION = 3
BATCH_ROWS = 8192
SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("source", pa.string()),
        ("tag", pa.string()),
        ("split", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
        ("n_labels", pa.int32()),
        ("full_tokens", pa.int32()),
    ]
)


class Encoder:
    """Turns conversations into (input_ids, labels) and documents into (input_ids, input_ids).

    Three ways to find the answer tokens, from fastest: `scan` (ChatML only: encode whole texts, then find
    each `<|im_start|>assistant\\n` header and its `<|im_end|>` in the ids), `pieces` (encode each piece on
    its own) and `offsets` (encode whole texts with character offsets; right for any tokenizer). The first
    batch decides: the fastest method that gives exactly what `offsets` gives is used for the rest."""

    METHODS = ("scan", "pieces", "offsets")

    def __init__(self, tokenizer):
        self.tokenizer, self.backend = tokenizer, tokenizer.backend_tokenizer
        self.pieces = pieces_for(tokenizer)
        self.method: str | None = None
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.header = self.end = self.newline = None
        if tokenizer.chat_template == CHATML:
            self.header = self.backend.encode(f"{BOS}assistant\n", add_special_tokens=False).ids
            self.end, self.newline = tokenizer.convert_tokens_to_ids(EOS), self.backend.encode("\n").ids

    def conversations(self, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
        split = [self.pieces(messages) for messages in conversations]
        if self.method is None:
            self.method = self.choose(split[:256])
        return getattr(self, f"encode_{self.method}")(split)

    def choose(self, split: list) -> str:
        reference = self.encode_offsets(split)
        for method in self.METHODS[:-1]:
            if (method != "scan" or self.header) and getattr(self, f"encode_{method}")(split) == reference:
                return method
        return "offsets"

    def encode_scan(self, split: list) -> list[tuple[list[int], list[int]]]:
        encoded = self.backend.encode_batch_fast(["".join(t for t, _ in p) for p in split], add_special_tokens=False)
        header, width = self.header, len(self.header)
        out = []
        for encoding in encoded:
            ids = encoding.ids
            labels = [IGNORE] * len(ids)
            start = 0
            while True:
                try:
                    start = ids.index(header[0], start)
                except ValueError:
                    break
                if ids[start : start + width] != header:
                    start += 1
                    continue
                first = start + width
                try:
                    last = ids.index(self.end, first) + 1
                except ValueError:
                    last = len(ids)
                if ids[last : last + len(self.newline)] == self.newline:
                    last += len(self.newline)
                labels[first:last] = ids[first:last]
                start = last
            out.append((ids, labels))
        return out

    def encode_pieces(self, split: list) -> list[tuple[list[int], list[int]]]:
        flat = self.backend.encode_batch_fast(
            [text for pieces in split for text, _ in pieces], add_special_tokens=False
        )
        out, k = [], 0
        for pieces in split:
            ids, labels = [], []
            for _, trained in pieces:
                piece = flat[k].ids
                ids += piece
                labels += piece if trained else [IGNORE] * len(piece)
                k += 1
            out.append((ids, labels))
        return out

    def encode_offsets(self, split: list) -> list[tuple[list[int], list[int]]]:
        """The general path: encode whole texts; a token is trained on when it starts inside an answer."""
        texts, spans = [], []
        for pieces in split:
            text, marks = "", []
            for piece, trained in pieces:
                if trained:
                    marks.append((len(text), len(text) + len(piece)))
                text += piece
            texts.append(text)
            spans.append(marks)
        out = []
        for encoding, marks in zip(self.backend.encode_batch(texts, add_special_tokens=False), spans):
            starts = np.array([start for start, _ in encoding.offsets])
            inside = np.zeros(len(starts), dtype=bool)
            for a, b in marks:
                inside |= (starts >= a) & (starts < b)
            ids = encoding.ids
            out.append((ids, [t if keep else IGNORE for t, keep in zip(ids, inside)]))
        return out

    def documents(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        encoded = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        return [(e.ids + self.eos, e.ids + self.eos) for e in encoded]

    def render(self, messages: list[dict]) -> str:
        return "".join(text for text, _ in self.pieces(messages))


def tokenize_key(ingest_key: str, tokenizer_dir: str, max_len: int, overlong: str) -> str:
    vocab = Path(tokenizer_dir) / "tokenizer.json"
    digest = file_digest(vocab) if vocab.is_file() else tokenizer_dir
    return fingerprint(TOKENIZE_VERSION, ingest_key, digest, max_len, overlong)


class TableWriter:
    """One token table written batch by batch, with per-source length statistics on the way."""

    def __init__(self, path: Path, max_len: int, overlong: str, rejected_out):
        self.writer = pq.ParquetWriter(path, SCHEMA)
        self.max_len, self.overlong, self.rejected_out = max_len, overlong, rejected_out
        self.lengths: dict[str, array] = defaultdict(lambda: array("I"))
        self.counts: dict[str, Counter] = defaultdict(Counter)

    def write(self, rows: dict, pairs: list[tuple[list[int], list[int]]]) -> None:
        keep = []
        for i, (ids, labels) in enumerate(pairs):
            source = rows["source"][i]
            self.lengths[source].append(len(ids))
            if len(ids) > self.max_len:
                self.counts[source]["over_max_seq_len"] += 1
                if self.overlong == "reject":
                    self.reject(rows, i, "too_long", f"{len(ids)} tokens > max_seq_len {self.max_len}")
                    continue
            kept_labels = labels[: self.max_len]
            if kept_labels.count(IGNORE) == len(kept_labels):
                self.reject(rows, i, "no_labels", "no answer token left within max_seq_len")
                continue
            keep.append(i)
        if keep:
            self.writer.write_table(self.table(rows, pairs, keep))

    def reject(self, rows: dict, i: int, reason: str, message: str) -> None:
        self.counts[rows["source"][i]][reason] += 1
        record = {
            "file": rows["source"][i],
            "line": rows["line"][i],
            "reason": reason,
            "field": None,
            "message": message,
            "sample_id": rows["sample_id"][i],
        }
        self.rejected_out.write(json.dumps(record, ensure_ascii=False) + "\n")

    def table(self, rows: dict, pairs: list, keep: list[int]) -> pa.Table:
        cut = [(pairs[i][0][: self.max_len], pairs[i][1][: self.max_len]) for i in keep]
        return pa.Table.from_pydict(
            {
                "sample_id": [rows["sample_id"][i] for i in keep],
                "source": [rows["source"][i] for i in keep],
                "tag": [rows["tag"][i] for i in keep],
                "split": [rows["split"][i] for i in keep],
                "input_ids": [ids for ids, _ in cut],
                "labels": [labels for _, labels in cut],
                "n_tokens": [len(ids) for ids, _ in cut],
                "n_labels": [len(lab) - lab.count(IGNORE) for _, lab in cut],
                "full_tokens": [len(pairs[i][0]) for i in keep],
            },
            schema=SCHEMA,
        )

    def close(self) -> dict[str, dict]:
        self.writer.close()
        return {
            source: length_stats(lengths, self.max_len, self.counts[source]) for source, lengths in self.lengths.items()
        }


class Packer:
    """The pre-training table: per source, documents (each ending in EOS) run together and cut into blocks of
    max_seq_len tokens; a source's last, shorter block is kept too, so no token is lost."""

    def __init__(self, path: Path, max_len: int):
        self.writer = pq.ParquetWriter(path, SCHEMA)
        self.max_len = max_len
        self.lengths: dict[str, array] = defaultdict(lambda: array("I"))
        self.buffers: dict[str, list[int]] = defaultdict(list)
        self.tags: dict[str, str] = {}
        self.blocks: Counter = Counter()
        self.kept: Counter = Counter()

    def write(self, rows: dict, pairs: list[tuple[list[int], list[int]]]) -> None:
        full = defaultdict(list)
        for i, (ids, _) in enumerate(pairs):
            source = rows["source"][i]
            self.lengths[source].append(len(ids))
            self.tags[source] = rows["tag"][i]
            buffer = self.buffers[source]
            buffer += ids
            while len(buffer) >= self.max_len:
                full[source].append(buffer[: self.max_len])
                del buffer[: self.max_len]
        self.emit(full)

    def emit(self, blocks: dict[str, list[list[int]]]) -> None:
        columns = {name: [] for name in SCHEMA.names}
        for source, chunks in blocks.items():
            for ids in chunks:
                columns["sample_id"].append(f"{source}#block{self.blocks[source]}")
                columns["source"].append(source)
                columns["tag"].append(self.tags[source])
                columns["split"].append("train")
                columns["input_ids"].append(ids)
                columns["labels"].append(ids)
                for name in ("n_tokens", "n_labels", "full_tokens"):
                    columns[name].append(len(ids))
                self.blocks[source] += 1
                self.kept[source] += len(ids)
        if columns["sample_id"]:
            self.writer.write_table(pa.Table.from_pydict(columns, schema=SCHEMA))

    def close(self) -> dict[str, dict]:
        self.emit({source: [buffer] for source, buffer in self.buffers.items() if buffer})
        self.writer.close()
        stats = {}
        for source, lengths in self.lengths.items():
            stats[source] = length_stats(lengths, self.max_len, Counter())
            stats[source].update(packed=True, blocks=self.blocks[source], tokens_kept=self.kept[source])
        return stats


def length_stats(lengths: array, max_len: int, counts: Counter) -> dict:
    values = np.frombuffer(lengths, dtype=np.uint32)
    p50, p90, p99 = (int(v) for v in np.percentile(values, [50, 90, 99]))
    edges = np.unique(np.linspace(0, max(int(values.max()), 1), 21).astype(int))
    hist, _ = np.histogram(values, bins=edges)
    return {
        "samples": len(values),
        "tokens": int(values.sum()),
        "mean": float(values.mean()),
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "max": int(values.max()),
        "over_max_seq_len_share": float((values > max_len).mean()),
        "histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
        **counts,
    }


def tokenize(
    samples_path: str, ingest_key: str, tokenizer_dir: str, max_len: int, output_dir: str, overlong: str = "truncate"
) -> TokenizedData:
    key = tokenize_key(ingest_key, tokenizer_dir, max_len, overlong)
    folder = entry_dir(output_dir, Entry.TOKENS, key)
    result = TokenizedData(
        key=key,
        folder=str(folder),
        sft=str(folder / "sft.parquet"),
        pretrain=str(folder / "pretrain.parquet"),
        rejected=str(folder / "rejected.jsonl"),
        stats={},
    )
    with building(folder) as build:
        if build:
            encode_all(samples_path, tokenizer_dir, max_len, overlong, result)
    result.stats = json.loads((folder / "stats.json").read_text())
    return result


def encode_all(samples_path: str, tokenizer_dir: str, max_len: int, overlong: str, result: TokenizedData) -> None:
    folder = Path(result.folder)
    encoder = Encoder(AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False))
    with open(result.rejected, "w", encoding="utf-8") as rejected:
        sft = TableWriter(Path(result.sft), max_len, overlong, rejected)
        pretrain = Packer(Path(result.pretrain), max_len)
        corpus = pretraining_tags(samples_path)
        for batch in pq.ParquetFile(samples_path).iter_batches(batch_size=BATCH_ROWS):
            encode_batch(batch.to_pydict(), encoder, sft, pretrain, corpus)
        result.stats = {"sft": sft.close(), "pretrain": pretrain.close(), "label_method": encoder.method}
    (folder / "stats.json").write_text(json.dumps(result.stats, indent=2))
    mark_complete(folder)


def pretraining_tags(samples_path: str) -> set[str]:
    """Pre-training reads general conversations as whole rendered text, so a scratch model learns the template;
    domain rows stay out (they are what fine-tuning adds), and so do validation rows. Data with no general or
    pretrain text at all (data.rehearsal: self, whose general source the base model writes later) leaves a
    scratch model the domain's conversations as the only text to learn to speak from."""
    tags = set(pq.read_table(samples_path, columns=["tag"]).column("tag").unique().to_pylist())
    return {"general", "pretrain"} if tags - {"domain"} else {"domain"}


def encode_batch(rows: dict, encoder: Encoder, sft: TableWriter, pretrain: Packer, corpus_tags: set[str]) -> None:
    chats = [i for i, tag in enumerate(rows["tag"]) if tag != "pretrain"]
    if chats:
        picked = {k: [v[i] for i in chats] for k, v in rows.items()}
        sft.write(picked, encoder.conversations([orjson.loads(m) for m in picked["messages"]]))
    corpus = [
        i for i, (tag, split) in enumerate(zip(rows["tag"], rows["split"])) if tag in corpus_tags and split == "train"
    ]
    if corpus:
        picked = {k: [v[i] for i in corpus] for k, v in rows.items()}
        texts = [
            encoder.render(orjson.loads(m)) if m is not None else t for m, t in zip(picked["messages"], picked["text"])
        ]
        pretrain.write(picked, encoder.documents(texts))


@task(
    name="tokenize",
    task_run_name="tokenize",
    retries=2,
    retry_delay_seconds=[2, 10],
    persist_result=True,
    result_serializer="json",
    cache_key_fn=lambda _ctx, p: prefect_cache_key(
        Entry.TOKENS, tokenize_key(p["ingest_key"], p["tokenizer_dir"], p["max_len"], p["overlong"]), p["output_dir"]
    ),
)
def tokenize_task(
    samples_path: str, ingest_key: str, tokenizer_dir: str, max_len: int, output_dir: str, overlong: str = "truncate"
) -> TokenizedData:
    result = tokenize(samples_path, ingest_key, tokenizer_dir, max_len, output_dir, overlong)
    for source, s in result.stats["sft"].items():
        run_logger().info(
            "%s: %d samples, tokens p50 %d p90 %d max %d, %.1f%% over max_seq_len",
            source,
            s["samples"],
            s["p50"],
            s["p90"],
            s["max"],
            100 * s["over_max_seq_len_share"],
        )
        rejects = {reason: s[reason] for reason in ("too_long", "no_labels") if s.get(reason)}
        if rejects:
            run_logger().warning(
                "%s: %d rows rejected at tokenising (%s); they count toward max_quarantine_fraction and are in %s",
                source,
                sum(rejects.values()),
                ", ".join(f"{reason} {n}" for reason, n in rejects.items()),
                result.rejected,
            )
    for source, s in result.stats["pretrain"].items():
        run_logger().info(
            "%s (pre-training): %d documents, %d tokens packed into %d blocks of up to %d, %.1f%% of tokens kept",
            source,
            s["samples"],
            s["tokens"],
            s["blocks"],
            max_len,
            100 * s["tokens_kept"] / max(s["tokens"], 1),
        )
    return result

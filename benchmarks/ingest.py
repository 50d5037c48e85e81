"""Ingest at scale: a generated MiniMind-style conversations file (1,000,000 rows, ~300 tokens each by
default) through parse -> validate -> dedupe (mixtune's ingest), then tokenisation, each in its own process
so that peak RSS is that phase's own. Baselines run in the same script: pandas `read_json(lines=True)` of
the same file, and the raw `tokenizers` batch-encode of the same rendered texts. The same rows are also
ingested as a `.jsonl.gz` file and as a folder of 4 Parquet shards, next to the plain JSONL.

    python benchmarks/ingest.py [--rows 1000000] [--workdir /tmp/mixtune-bench] [--ingest-only]

Prints one table; figures are ratios and rates from this run only (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORDS = [
    w.strip()
    for w in """the of and to in is was for on that with as by at from his her an were are which this
be or has had not but its they their one two new first after also who more other into time can may than over
only most some when state system model data train value river mountain city music history science energy water
protein cell market price language number function return result patient dose study theory""".split()
]


def generate(path: Path, clean: Path, rows: int, seed: int = 0) -> None:
    """~300 tokens per row; 1% exact duplicates and 0.1% broken lines, as real dumps have. `clean` is the
    same file without the broken lines, for the pandas baseline (which stops at the first one)."""
    rng, earlier = random.Random(seed), ""
    with path.open("w", encoding="utf-8") as out, clean.open("w", encoding="utf-8") as tidy:
        for i in range(rows):
            if i % 1000 == 999:
                out.write('{"conversations": [{"role": "user", "content": "broken\n')
                continue
            if i % 100 == 50 and i > 100:
                line = earlier  # an exact duplicate of the row 50 lines up
            else:
                question = " ".join(rng.choices(WORDS, k=60)) + f" #{i}"
                answer = " ".join(rng.choices(WORDS, k=200))
                row = {
                    "conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                }
                line = json.dumps(row) + "\n"
            if i % 100 == 0:
                earlier = line
            out.write(line)
            tidy.write(line)


class TreeRSS:
    """Peak resident memory of this process plus all its descendants (worker processes included), sampled
    every 50 ms: ru_maxrss alone misses workers started through a forkserver."""

    def __init__(self):
        import psutil

        self.process, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while not self.stop.wait(0.05):
            try:
                tree = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in tree))
            except Exception:  # a worker may exit between listing and reading it
                continue

    def finish(self) -> float:
        self.stop.set()
        self.thread.join()
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(self.peak, own) / 2**20


def phase_pandas(path: str) -> dict:
    import pandas as pd

    started = time.perf_counter()
    frame = pd.read_json(path, lines=True)
    seconds = time.perf_counter() - started
    return {"rows": len(frame), "seconds": seconds}


def phase_ingest(path: str, workdir: str) -> dict:
    from mixtune.core.config import validate_config
    from tasks.ingest import ingest

    general = Path(workdir) / "general.jsonl"
    general.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n"
    )
    raw = {
        "run": {"output_dir": str(Path(workdir) / "runs")},
        "data": {
            "max_quarantine_fraction": 1.0,
            "sources": [
                {"path": str(general), "role": "general", "val_fraction": 0},
                {"path": path, "role": "domain", "max_val_samples": 2000},
            ],
        },
    }
    config = validate_config(raw, "benchmark", base_dir=Path(workdir))
    started = time.perf_counter()
    result = ingest(config)
    seconds = time.perf_counter() - started
    stats = result.stats[path]
    return {
        "rows": stats.rows_read,
        "seconds": seconds,
        "accepted": stats.accepted,
        "duplicates": stats.duplicates,
        "quarantined": stats.quarantined,
        "samples": result.samples,
        "key": result.key,
    }


def containers(data: Path, clean: Path, work: Path) -> tuple[Path, Path]:
    """The file gzip-compressed (streamed, level 6), and its rows less the broken lines (Parquet cannot hold
    them) as 4 Parquet shards: the same data in the containers sets are published in."""
    import gzip
    import shutil

    import pyarrow.json as pj
    import pyarrow.parquet as pq

    packed, shards = work / f"{data.name}.gz", work / f"{clean.stem}-parquet"
    if not packed.is_file():
        with data.open("rb") as source, gzip.open(packed, "wb", compresslevel=6) as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
    if not shards.is_dir():
        table = pj.read_json(clean)
        shards.mkdir()
        step = -(-table.num_rows // 4)
        for k in range(4):
            pq.write_table(table.slice(k * step, step), shards / f"train-{k:05d}-of-00004.parquet")
    return packed, shards


def train_tokenizer(samples: str, workdir: str) -> str:
    import pyarrow.parquet as pq

    from tasks.base_model import train_tokenizer as train

    texts = []
    for batch in pq.ParquetFile(samples).iter_batches(batch_size=20000, columns=["messages"]):
        texts += [m for m in batch.column("messages").to_pylist() if m]
        break
    folder = Path(workdir) / "tokenizer"
    train(texts, 6400, folder)
    return str(folder)


def phase_tokenize(samples: str, key: str, tokenizer_dir: str, workdir: str) -> dict:
    from tasks.tokenize import tokenize

    started = time.perf_counter()
    result = tokenize(samples, key, tokenizer_dir, 512, str(Path(workdir) / "runs"))
    seconds = time.perf_counter() - started
    sft = result.stats["sft"]
    tokens = sum(s["tokens"] for s in sft.values())
    return {"tokens": tokens, "seconds": seconds, "method": result.stats["label_method"]}


def phase_raw_encode(samples: str, tokenizer_dir: str) -> dict:
    """The same texts, rendered beforehand (not timed), through tokenizers' batch encode alone."""
    import orjson
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from tasks.chat import chatml_pieces

    backend = AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer
    seconds, tokens = 0.0, 0
    for batch in pq.ParquetFile(samples).iter_batches(batch_size=8192, columns=["messages"]):
        texts = ["".join(t for t, _ in chatml_pieces(orjson.loads(m))) for m in batch.column("messages").to_pylist()]
        started = time.perf_counter()
        encoded = backend.encode_batch_fast(texts, add_special_tokens=False)
        seconds += time.perf_counter() - started
        tokens += sum(len(e.ids) for e in encoded)
    return {"tokens": tokens, "seconds": seconds}


def run_phase(name: str, *args: str) -> dict:
    """Each phase in a fresh interpreter: its peak RSS is its own (workers reported separately)."""
    done = subprocess.run(
        [sys.executable, __file__, "--phase", name, *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    if done.returncode:
        raise RuntimeError(f"phase {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def phase_main(name: str, args: list[str]) -> None:
    phases = {
        "pandas": phase_pandas,
        "ingest": phase_ingest,
        "tokenize": phase_tokenize,
        "raw": phase_raw_encode,
        "tokenizer": lambda *a: {"folder": train_tokenizer(*a)},
    }
    rss = TreeRSS()
    result = phases[name](*args)
    result.update(peak_rss_mib=rss.finish())
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--workdir", default="/tmp/mixtune-bench")
    parser.add_argument("--ingest-only", action="store_true", help="only the ingest rates by container")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.phase:
        return phase_main(args.phase, rest)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    data, clean = work / f"conversations-{args.rows}.jsonl", work / f"conversations-{args.rows}-clean.jsonl"
    if not clean.is_file():
        generate(data, clean, args.rows)
    size_mib = data.stat().st_size / 2**20
    subprocess.run(["rm", "-rf", str(work / "runs")], check=True)
    packed, shards = containers(data, clean, work)
    gzipped = run_phase("ingest", str(packed), str(work))
    subprocess.run(["rm", "-rf", str(work / "runs")], check=True)  # each read from scratch, not from the cache
    sharded = run_phase("ingest", str(shards), str(work))
    subprocess.run(["rm", "-rf", str(work / "runs")], check=True)
    ingest = run_phase("ingest", str(data), str(work))  # last: tokenise reads its cache entry
    gz_name = f"{packed.name} ({packed.stat().st_size / 2**20:,.0f} MiB)"
    report_containers(ingest, {gz_name: gzipped, f"{shards.name}/ (4 Parquet shards)": sharded})
    if args.ingest_only:
        return
    pandas = run_phase("pandas", str(clean))
    tokenizer = run_phase("tokenizer", ingest["samples"], str(work))["folder"]
    tokenize = run_phase("tokenize", ingest["samples"], ingest["key"], tokenizer, str(work))
    raw = run_phase("raw", ingest["samples"], tokenizer)
    report(args.rows, size_mib, ingest, pandas, tokenize, raw)


def report(rows: int, size_mib: float, ingest: dict, pandas: dict, tokenize: dict, raw: dict) -> None:
    ingest_rate, pandas_rate = ingest["rows"] / ingest["seconds"], pandas["rows"] / pandas["seconds"]
    ours, baseline = tokenize["tokens"] / tokenize["seconds"], raw["tokens"] / raw["seconds"]
    peak = max(ingest["peak_rss_mib"], tokenize["peak_rss_mib"])
    print(f"cores: {os.cpu_count()}   file: {rows:,} rows, {size_mib:,.0f} MiB")
    print(
        f"ingest (parse+validate+dedupe+write): {ingest_rate:,.0f} rows/s  "
        f"[accepted {ingest['accepted']:,}, duplicates {ingest['duplicates']:,}, quarantined {ingest['quarantined']:,}]"
        f"  peak RSS {ingest['peak_rss_mib']:,.0f} MiB (with its worker processes)"
    )
    print(
        f"pandas read_json(lines=True) baseline (same file less its broken lines, which stop it): "
        f"{pandas_rate:,.0f} rows/s  peak RSS {pandas['peak_rss_mib']:,.0f} MiB"
        f"  -> mixtune ingest is {ingest_rate / pandas_rate:.2f}x its rate"
    )
    print(
        f"tokenise (labels, write): {ours:,.0f} tokens/s ({tokenize['tokens']:,} tokens, labels by "
        f"{tokenize['method']})  peak RSS {tokenize['peak_rss_mib']:,.0f} MiB"
    )
    print(
        f"raw tokenizers encode_batch_fast, same texts: {baseline:,.0f} tokens/s  -> mixtune at "
        f"{ours / baseline:.0%} of raw"
    )
    print(f"peak RSS of ingest or tokenise / file size: {peak / size_mib:.2f}x (goal <= 2x)")


def report_containers(plain: dict, others: dict[str, dict]) -> None:
    rate = plain["rows"] / plain["seconds"]
    print(f"cores: {os.cpu_count()}")
    print(f"ingest by container: plain JSONL {rate:,.0f} rows/s ({plain['rows']:,} rows)", flush=True)
    for name, result in others.items():
        other = result["rows"] / result["seconds"]
        print(
            f"  {name}: {other:,.0f} rows/s ({result['rows']:,} rows, {other / rate:.2f}x plain)  "
            f"peak RSS {result['peak_rss_mib']:,.0f} MiB",
            flush=True,
        )


if __name__ == "__main__":
    main()

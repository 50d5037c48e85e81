"""The token tables stages read: training rows of a stage's mix, and the validation sets."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import torch

IGNORE = -100  # label of a token that is not scored (prompt, padding)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, table: pd.DataFrame):
        self.input_ids = list(table["input_ids"])
        self.labels = list(table["labels"])

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def validation_sets(sft_path: str, tags: tuple[str, ...] = ("domain", "general")) -> dict[str, TokenDataset]:
    """The held-out rows per tag; a general_eval set only when the run has such rows."""
    val = pq.read_table(sft_path, columns=["tag", "input_ids", "labels"], filters=[("split", "==", "val")]).to_pandas()
    return {
        tag: TokenDataset(val[val["tag"] == tag]) for tag in tags if tag != "general_eval" or (val["tag"] == tag).any()
    }


def validation_halves(sft_path: str, tags: tuple[str, ...]) -> dict[tuple[str, int], TokenDataset]:
    """Each validation set cut in two by sample id (even and odd places in id order): half 0 chooses, half 1
    checks the choice on rows that did not make it. The same halves for every model and rerun."""
    val = pq.read_table(
        sft_path, columns=["sample_id", "tag", "input_ids", "labels"], filters=[("split", "==", "val")]
    ).to_pandas()
    halves = {}
    for tag in tags:
        rows = val[val["tag"] == tag].sort_values("sample_id", kind="stable").reset_index(drop=True)
        if tag == "general_eval" and rows.empty:  # a run without general_eval sources
            continue
        for half in (0, 1):
            halves[(tag, half)] = TokenDataset(rows.iloc[half::2])
    return halves


def stage_table(sft_path: str, manifest: str) -> pd.DataFrame:
    """The stage's training rows (token ids and labels) in the manifest's order, repeats included; only the
    drawn rows are read, so a stage's memory follows its size, not the whole data set's."""
    order = pd.read_parquet(manifest, columns=["sample_id"])
    wanted = order["sample_id"].unique().tolist()
    rows = pq.read_table(
        sft_path,
        columns=["sample_id", "split", "input_ids", "labels"],
        filters=[("sample_id", "in", wanted), ("split", "==", "train")],
    ).to_pandas()
    by_id = rows.drop_duplicates("sample_id").set_index("sample_id")
    return by_id.loc[order["sample_id"]].reset_index()


def domain_val_digest(sft_path: str) -> str:
    """Which domain validation a model was judged on: the files its domain validation rows come from (by
    name). New rows in the same files keep it, so retraining on more data still challenges the champion
    (which is re-scored on the challenger's rows); another pipeline's domain files change it."""
    rows = pq.read_table(sft_path, columns=["source"], filters=[("split", "==", "val"), ("tag", "==", "domain")])
    names = sorted({Path(source).name for source in rows.column("source").to_pylist()})
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def validation_digest(sft_path: str) -> str:
    """What the validation sets are, token for token: a loss measured on them holds while this does. Rows by
    id, so the same sets read in another order are the same sets."""
    val = pq.read_table(
        sft_path, columns=["sample_id", "tag", "input_ids", "labels"], filters=[("split", "==", "val")]
    ).sort_by("sample_id")
    digest = hashlib.sha256()
    for batch in val.to_batches(max_chunksize=1024):
        digest.update(json.dumps(batch.to_pydict(), separators=(",", ":")).encode())
    return digest.hexdigest()[:20]

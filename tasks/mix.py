"""The ratio schedule and each stage's mix of domain into general data.

A stage's mix is drawn deterministically from (seed, stage): the same config always trains on the same
samples in the same order, and a retried stage sees exactly what the first try saw. The realised share
is counted from the drawn rows, never copied from the target.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from prefect import task

from mixtune.core.disk import DiskFull
from mixtune.core.logs import run_logger
from mixtune.core.retry import retry_unless
from tasks.checkpoints import space_in_stage
from tasks.records import StageMix


def draw(pool: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """n rows without repeats while the pool lasts; beyond it, whole reshuffled passes (epoch-like repeats)."""
    if n == 0 or pool.empty:
        return pool.iloc[:0]
    passes = [rng.permutation(len(pool)) for _ in range(math.ceil(n / len(pool)))]
    return pool.iloc[np.concatenate(passes)[:n]]


def mix_stage(
    train: pd.DataFrame, stage: int, share: float, samples: int, seed: int, manifest: str, epochs: float = 1.0
) -> StageMix:
    """Draw one stage's mix from the train split with the target domain share, and write the exact sequence
    the trainer will see: the mix repeated `epochs` times, each pass in a fresh seeded order."""
    domain_pool = train[train["tag"] == "domain"]
    general_pool = train[train["tag"] == "general"]
    if domain_pool.empty or general_pool.empty:
        raise ValueError("mixing needs domain and general training samples; one of them is empty")
    n_domain = round(share * samples)
    rng = np.random.default_rng([seed, stage])
    drawn = pd.concat([draw(domain_pool, n_domain, rng), draw(general_pool, samples - n_domain, rng)])
    order = np.concatenate([rng.permutation(len(drawn)) for _ in range(math.ceil(epochs))])
    sequence = drawn.iloc[order[: round(len(drawn) * epochs)]]
    sequence = sequence[["sample_id", "source", "tag", "n_tokens"]].reset_index(drop=True)
    stage_dir = Path(manifest).parent
    stage_dir.mkdir(parents=True, exist_ok=True)
    # The first write into a new stage's folder: where a disk that filled since the last stage is met.
    needed = int(sequence.memory_usage(deep=True).sum())
    with space_in_stage(stage_dir, stage_dir, "the stage's mix", needed, run_logger().warning):
        sequence.to_parquet(manifest, index=False)
    is_domain = sequence["tag"] == "domain"
    return StageMix(
        stage=stage,
        target_share=share,
        realised_share=float(is_domain.mean()),
        realised_token_share=float(sequence.loc[is_domain, "n_tokens"].sum() / sequence["n_tokens"].sum()),
        samples=len(sequence),
        domain_samples=int(is_domain.sum()),
        general_samples=int((~is_domain).sum()),
        domain_epochs=int(is_domain.sum()) / len(domain_pool),
        general_epochs=int((~is_domain).sum()) / len(general_pool),
        manifest=manifest,
        source_epochs=source_epochs(sequence, train),
    )


def source_epochs(sequence: pd.DataFrame, train: pd.DataFrame) -> dict[str, float]:
    drawn, pool = sequence["source"].value_counts(), train["source"].value_counts()
    return {source: float(drawn.get(source, 0) / pool[source]) for source in pool.index}


@task(
    name="mix",
    task_run_name="mix stage {stage} (share {share:.2f})",
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless(DiskFull),
)
def mix_task(
    sft_path: str, stage: int, share: float, samples: int, seed: int, manifest: str, epochs: float = 1.0
) -> StageMix:
    train = pd.read_parquet(sft_path, columns=["sample_id", "source", "tag", "split", "n_tokens"])
    mix = mix_stage(train[train["split"] == "train"], stage, share, samples, seed, manifest, epochs)
    run_logger().info(
        "stage %d mix: target %.3f realised %.3f (%d domain / %d general; domain pool seen %.2fx, general %.2fx)",
        stage,
        mix.target_share,
        mix.realised_share,
        mix.domain_samples,
        mix.general_samples,
        mix.domain_epochs,
        mix.general_epochs,
    )
    return mix

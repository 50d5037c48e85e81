"""Test environment: offline, no telemetry, Prefect state in a throwaway PREFECT_HOME, and one Prefect
test harness (an ephemeral server, 11-19 s to start) shared by every test that runs a flow."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="mixtune-prefect-")
os.environ.pop("MLFLOW_TRACKING_URI", None)
import mixtune  # noqa: E402,F401  (applies the offline defaults before Prefect is imported)
from mixtune.core.config import validate_config  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def tiny_raw_config(output_dir: Path, **sections) -> dict:
    """A config small enough for a test: a 2-layer model, 3 stages of 10 steps each."""
    raw = {
        "run": {"name": "test", "output_dir": str(output_dir), "seed": 0},
        "data": {
            "sources": [
                {"synthetic": "general", "samples": 800, "role": "general"},
                {"synthetic": "domain", "samples": 400, "role": "domain", "val_fraction": 0.15},
            ]
        },
        "model": {"preset": "tiny", "max_seq_len": 128},
        "pretrain": {"epochs": 1},
        "schedule": {"start": 0.1, "end": 0.5, "stages": 3, "samples_per_stage": 160},
        "train": {"method": "full", "batch_size": 16, "logging_steps": 5},
        "validation": {"eval_steps": 5, "patience": 3},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return raw


def tiny_config(output_dir: Path, **sections):
    return validate_config(tiny_raw_config(output_dir, **sections), "test config", base_dir=output_dir)


def tiny_hf_model(folder: Path) -> Path:
    """A real (random, tiny) Hugging Face model folder with a tokenizer: what a registry version needs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.base_model import train_tokenizer

    tokenizer = train_tokenizer(["a tiny model for the registry"] * 20, 300, folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder

"""Opt-in: the SmolLM2-135M-Instruct folder benchmarks/smollm2.py builds, when it has been built (nothing here
downloads it): in $MIXTUNE_SMOLLM2_CACHE, else the script's default cache."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("smollm2", ROOT / "benchmarks" / "smollm2.py")
smollm2 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(smollm2)
CACHE = smollm2.DEFAULT_CACHE
FOLDER = CACHE / "SmolLM2-135M-Instruct"

pytestmark = pytest.mark.skipif(not (FOLDER / smollm2.DONE).is_file(), reason=f"no built SmolLM2 folder in {CACHE}")


def test_the_built_folder_is_reused_loads_as_plain_weights_and_answers_chat_messages():
    from transformers import pipeline

    assert smollm2.build(CACHE) == FOLDER  # built once: a finished folder is returned as it is
    generate = pipeline("text-generation", model=str(FOLDER))
    assert getattr(generate.model.config, "quantization_config", None) is None
    [chat] = generate(
        [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=16, do_sample=False
    )
    answer = chat["generated_text"][-1]
    assert answer["role"] == "assistant" and "Paris" in answer["content"]

"""Pre-training text is packed into max_seq_len blocks, not cut at max_seq_len; max_steps caps the stage."""

import random

import pandas as pd
import pytest

from tasks import lm
from tasks.base_model import prepare_base, prepare_tokenizer
from tasks.ingest import ingest
from tasks.tokenize import tokenize
from tests.conftest import tiny_config

WORDS = "river stone light garden market winter letter engine forest number village paper".split()


def long_documents(path, count: int, words: int) -> None:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(count)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def prepared(tmp_path, **pretrain):
    text = tmp_path / "articles.txt"
    long_documents(text, count=10, words=700)  # a word is about one token here: ~5x max_seq_len of 128
    config = tiny_config(tmp_path, pretrain={"epochs": 1, **pretrain})
    config.data.sources.append(config.data.sources[0].model_copy(update={"synthetic": None, "path": str(text)}))
    config.data.sources[-1].role = "pretrain"
    data = ingest(config)
    tokenizer_dir = prepare_tokenizer(config, data.samples, data.key)
    tokens = tokenize(data.samples, data.key, tokenizer_dir, config.model.max_seq_len, config.run.output_dir)
    return config, str(text), tokenizer_dir, tokens


def test_long_documents_keep_their_tokens_in_blocks(tmp_path):
    config, text, _, tokens = prepared(tmp_path)
    stats = tokens.stats["pretrain"][text]
    assert stats["samples"] == 10 and stats["p50"] > 4 * config.model.max_seq_len
    table = pd.read_parquet(tokens.pretrain)
    blocks = table[table["source"] == text]
    assert blocks["n_tokens"].max() == config.model.max_seq_len
    assert blocks["n_tokens"].sum() == stats["tokens_kept"] == stats["tokens"]
    assert stats["tokens_kept"] / stats["tokens"] >= 0.99
    assert stats["blocks"] == len(blocks) >= stats["tokens"] // config.model.max_seq_len


@pytest.mark.e2e
def test_max_steps_caps_pretraining(tmp_path, monkeypatch):
    config, _, tokenizer_dir, tokens = prepared(tmp_path, max_steps=3)
    steps, original = [], lm.TokenLossTrainer.training_step

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(lm.TokenLossTrainer, "training_step", counting_step)
    prepare_base(config, tokenizer_dir, tokens.pretrain, tokens.key)
    assert len(steps) == 3 < len(pd.read_parquet(tokens.pretrain)) / config.pretrain.batch_size

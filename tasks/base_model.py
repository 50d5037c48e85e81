"""The base model: a local Hugging Face folder, or a preset built from scratch with native transformers
classes plus a byte-level BPE tokenizer trained on the ingested text, then briefly pre-trained on general
text so that fine-tuning has general ability to keep (or lose)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import torch
from prefect import task
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mixtune.core.cache import Entry, building, entry_dir, fingerprint, mark_complete, prefect_cache_key
from mixtune.core.config import PipelineConfig
from mixtune.core.disk import DiskFull
from mixtune.core.logs import run_logger
from mixtune.core.retry import retry_unless
from tasks.callbacks import LiveProgress, ProgressCallback
from tasks.chat import BOS, CHATML, EOS, PAD
from tasks.checkpoints import Seal, checkpoint_bytes, last_good_checkpoint, make_room, space_for_checkpoints
from tasks.footprint import DiskNeed, estimate
from tasks.lm import PadCollator, TokenLossTrainer, training_arguments
from tasks.tables import TokenDataset

BASE_VERSION = 2
TOKENIZER_TEXT_BUDGET = 50_000_000  # characters: enough for a small BPE; a 1M-row file need not be held whole
# MiniMind's shapes on Llama classes (RMSNorm, SwiGLU, RoPE, grouped KV heads, tied embeddings).
PRESETS = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=192,
        vocab_size=1024,
    ),
    "small": dict(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=384,
        vocab_size=2048,
    ),
    "minimind2-small": dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1408,
        vocab_size=6400,
    ),
}


def is_scratch(config: PipelineConfig) -> bool:
    return config.model.path is None


def needs_pretraining(config: PipelineConfig) -> bool:
    enabled = config.pretrain.enabled
    return is_scratch(config) if enabled == "auto" else enabled


def preset_shapes(config: PipelineConfig) -> dict:
    shapes = dict(PRESETS[config.model.preset])
    if config.model.vocab_size is not None:
        shapes["vocab_size"] = config.model.vocab_size
    return shapes


def tokenizer_key(config: PipelineConfig, ingest_key: str) -> str:
    return fingerprint(BASE_VERSION, "tokenizer", ingest_key, preset_shapes(config)["vocab_size"])


def train_tokenizer(texts: list[str], vocab_size: int, folder: Path) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=PAD, chat_template=CHATML
    )
    tokenizer.save_pretrained(folder)
    return tokenizer


def corpus_texts(samples_path: str) -> list[str]:
    """Training-split text only (validation rows must not shape the vocabulary either), up to a budget."""
    texts, size = ["system", "user", "assistant", "<think>", "</think>"], 0
    for batch in pq.ParquetFile(samples_path).iter_batches(batch_size=8192, columns=["messages", "text", "split"]):
        rows = batch.to_pydict()
        for messages, text, split in zip(rows["messages"], rows["text"], rows["split"]):
            if split != "train":
                continue
            parts = [text] if text is not None else [t["content"] for t in json.loads(messages)]
            texts += parts
            size += sum(map(len, parts))
            if size >= TOKENIZER_TEXT_BUDGET:
                return texts
    return texts


def prepare_tokenizer(config: PipelineConfig, samples_path: str, ingest_key: str) -> str:
    """The tokenizer folder: the user's model folder, or a BPE trained here (cached by the data's hash)."""
    if not is_scratch(config):
        return config.model.path
    folder = entry_dir(config.run.output_dir, Entry.TOKENIZER, tokenizer_key(config, ingest_key))
    with building(folder) as build:
        if build:
            train_tokenizer(corpus_texts(samples_path), preset_shapes(config)["vocab_size"], folder)
            mark_complete(folder)
    return str(folder)


def build_model(config: PipelineConfig, tokenizer) -> LlamaForCausalLM:
    shapes = preset_shapes(config)
    shapes["vocab_size"] = len(tokenizer)
    model_config = LlamaConfig(
        **shapes,
        max_position_embeddings=config.model.max_seq_len,
        rope_theta=1e6,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.run.seed)
    return LlamaForCausalLM(model_config)


def parameter_counts(config: PipelineConfig) -> tuple[int, int]:
    """(parameters, trained parameters) of the model a run trains, counted on a weightless (meta) model built
    from the preset's shapes or model.path's config.json: nothing is loaded or allocated."""
    with torch.device("meta"):
        if config.model.path:
            shapes = AutoConfig.from_pretrained(config.model.path, trust_remote_code=False)
            model = AutoModelForCausalLM.from_config(shapes, trust_remote_code=False)
        else:
            model = LlamaForCausalLM(LlamaConfig(**preset_shapes(config), tie_word_embeddings=True))
    total = sum(p.numel() for p in model.parameters())
    if config.train.method == "full":
        return total, total
    lora, targets = config.train.lora, set(config.train.lora.target_modules)
    linears = [
        m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets and hasattr(m, "in_features")
    ]
    return total, sum(lora.r * (m.in_features + m.out_features) for m in linears)


def disk_need(config: PipelineConfig) -> DiskNeed:
    return estimate(config, *parameter_counts(config), pretrains=needs_pretraining(config))


def pretrain_key(config: PipelineConfig, tokens_key: str) -> str:
    origin = config.model.path or preset_shapes(config)
    return fingerprint(BASE_VERSION, "pretrain", tokens_key, origin, config.pretrain.model_dump(), config.run.seed)


def prepare_base(config: PipelineConfig, tokenizer_dir: str, pretrain_table: str, tokens_key: str) -> str:
    """The folder of the model every stage starts from."""
    if not needs_pretraining(config):
        return config.model.path
    folder = entry_dir(config.run.output_dir, Entry.BASE, pretrain_key(config, tokens_key))
    with building(folder) as build:
        if build:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
            model = (
                AutoModelForCausalLM.from_pretrained(config.model.path, trust_remote_code=False)
                if config.model.path
                else build_model(config, tokenizer)
            )
            pretrain(model, tokenizer, pd.read_parquet(pretrain_table), config, folder)
            mark_complete(folder)
    return str(folder)


def pretrain(model, tokenizer, table: pd.DataFrame, config: PipelineConfig, folder: Path) -> None:
    if table.empty:
        raise ValueError("pre-training needs general or pretrain text, and the ingested data has none")
    p = config.pretrain
    args = training_arguments(
        str(folder / "checkpoints"),
        epochs=p.epochs,
        max_steps=p.max_steps or -1,
        learning_rate=config.pretrain_learning_rate()[0],
        batch_size=p.batch_size,
        eval_batch_size=config.validation.batch_size,
        seed=config.run.seed,
        precision=config.train.precision,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        logging_steps=config.train.logging_steps,
        # Five sealed checkpoints over the run (a fraction of its steps), two kept: a crash costs a fifth at most.
        save_strategy="steps",
        save_steps=0.2,
        save_total_limit=2,
        weight_decay=0.01,
        order="random",
    )
    trainer = TokenLossTrainer(
        model=model,
        args=args,
        train_dataset=TokenDataset(table),
        data_collator=PadCollator(tokenizer.pad_token_id),
        callbacks=[ProgressCallback("pretrain", run_logger().info), LiveProgress("pretrain"), Seal()],
    )
    checkpoints, aside, warn = folder / "checkpoints", folder / "set-aside", run_logger().warning
    resume = last_good_checkpoint(checkpoints, aside, warn)
    if resume:
        run_logger().info("pre-training resumes from %s; later steps are redone", resume)
    needed = checkpoint_bytes(model)
    make_room(checkpoints, aside, needed, warn)
    with space_for_checkpoints(checkpoints, "a pre-training checkpoint", needed, checkpoints, aside, warn):
        trainer.train(resume_from_checkpoint=resume)
    with space_for_checkpoints(folder, "the base model", needed, checkpoints, aside, warn):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    shutil.rmtree(folder / "checkpoints")  # the cache entry is the model; optimizer state has served its purpose


@task(
    name="tokenizer",
    task_run_name="tokenizer",
    retries=2,
    retry_delay_seconds=[2, 10],
    persist_result=True,
    result_serializer="json",
    cache_key_fn=lambda _ctx, p: (
        prefect_cache_key(Entry.TOKENIZER, tokenizer_key(p["config"], p["ingest_key"]), p["config"].run.output_dir)
        if is_scratch(p["config"])
        else None
    ),
)
def tokenizer_task(config: PipelineConfig, samples_path: str, ingest_key: str) -> str:
    return prepare_tokenizer(config, samples_path, ingest_key)


@task(
    name="pretrain",
    task_run_name="pretrain",
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=retry_unless(DiskFull),
    persist_result=True,
    result_serializer="json",
    cache_key_fn=lambda _ctx, p: (
        prefect_cache_key(Entry.BASE, pretrain_key(p["config"], p["tokens_key"]), p["config"].run.output_dir)
        if needs_pretraining(p["config"])
        else None
    ),
)
def pretrain_task(config: PipelineConfig, tokenizer_dir: str, pretrain_table: str, tokens_key: str) -> str:
    folder = prepare_base(config, tokenizer_dir, pretrain_table, tokens_key)
    run_logger().info("base model: %s", folder)
    return folder

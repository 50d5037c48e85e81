"""Models on disk: a stage's output (a full HF folder, or a LoRA adapter over the base), loaded for
evaluation, scored on the validation sets, and made standalone for the registry."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixtune.core.cache import file_digest, is_complete, mark_complete
from tasks.callbacks import LiveBar
from tasks.lm import PadCollator, mean_token_loss
from tasks.records import TokenLosses
from tasks.tables import validation_sets


def is_adapter(folder: str) -> bool:
    return (Path(folder) / "adapter_config.json").is_file()


def weights_digest(model_dir: str) -> str:
    """What a saved model is, for "is this still the model that was evaluated?": its weight files (a user's
    model may hold PyTorch .bin files instead of safetensors)."""
    files = sorted([*Path(model_dir).glob("*.safetensors"), *Path(model_dir).glob("*.bin")])
    return ",".join(f"{f.name}:{file_digest(f)}" for f in files)


def load_model(model_dir: str, base_dir: str):
    """A stage's output: a full model folder, or an adapter folder applied to the base model."""
    if is_adapter(model_dir):
        base = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=False)
        return PeftModel.from_pretrained(base, model_dir)
    return AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False)


ALL_SETS = ("domain", "general", "general_eval")


def set_losses(
    model_dir: str, base_dir: str, sft_path: str, batch_size: int, tags: tuple[str, ...], label: str = "validation loss"
) -> dict:
    """Mean token loss per validation set, for those of `tags` the run has (none: the model is not loaded)."""
    sets = validation_sets(sft_path, tags)
    if not sets:
        return {}
    model = load_model(model_dir, base_dir)
    if torch.cuda.is_available():
        model = model.to("cuda")
    collator = PadCollator(AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False).pad_token_id)
    with LiveBar(label, sum(len(data) for data in sets.values())) as bar:
        return {tag: mean_token_loss(model, data, collator, batch_size, bar.advance) for tag, data in sets.items()}


def evaluate(
    model_dir: str, base_dir: str, sft_path: str, batch_size: int, label: str = "validation loss"
) -> TokenLosses:
    return TokenLosses(**set_losses(model_dir, base_dir, sft_path, batch_size, ALL_SETS, label))


def standalone_model(final_dir: str, base_dir: str, folder: Path) -> str:
    """What gets registered must load on its own: a LoRA adapter is merged into its base first."""
    if not is_adapter(final_dir):
        return final_dir
    if not is_complete(folder):
        load_model(final_dir, base_dir).merge_and_unload().save_pretrained(folder)
        AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False).save_pretrained(folder)
        mark_complete(folder)
    return str(folder)

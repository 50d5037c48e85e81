"""What pre-training and every SFT/LoRA stage share: datasets of token ids, padding, the loss that
validation reports, and a transformers Trainer that evaluates with that same loss."""

from __future__ import annotations

import logging
import math
import warnings

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging as transformers_logging

from tasks.tables import IGNORE, TokenDataset

transformers_logging.disable_progress_bar()


class HarmlessNotices(logging.Filter):
    """Two Trainer lines that alarm users for nothing: checkpoints of tied-embedding models omit lm_head (it
    *is* the embedding), and checkpoint folders are ordered by number when mtime is coarse (which is right)."""

    HARMLESS = ("checkpoint model loaded: ['lm_head.weight']", "mtime may not be reliable")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.HARMLESS)


for _name in ("transformers.trainer", "transformers.trainer_utils"):
    transformers_logging.get_logger(_name).addFilter(HarmlessNotices())
logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
# peft asks transformers 5 for the old name on every LoRA stage; nothing a user can act on.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


class PadCollator:
    """Pads to the longest sample in the batch (not to max_seq_len, as MiniMind does): far fewer wasted FLOPs."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n] = torch.tensor(b["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(b["labels"], dtype=torch.long)
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@torch.no_grad()
def mean_token_loss(model, dataset: TokenDataset, collator: PadCollator, batch_size: int) -> float:
    """Cross-entropy averaged over every labelled token of the set: the one validation loss mixtune reports.

    Averaging over tokens rather than over batches makes the number independent of batch size and order,
    so a reloaded checkpoint gives the logged value again."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        shifted = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), shifted.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        total += losses.item()
        count += int((shifted != IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)


class TokenLossTrainer(Trainer):
    """Evaluates with mean_token_loss, so in-training curves, early stopping and final numbers agree."""

    def __init__(self, *args, general_limit: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # ProgressCallback prints the same numbers as one readable line.
        self.remove_callback(PrinterCallback)
        self.general_limit = general_limit

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        sets = eval_dataset if eval_dataset is not None else self.eval_dataset
        if not isinstance(sets, dict):
            sets = {"": sets}
        metrics = {}
        for name, dataset in sets.items():
            key = f"{metric_key_prefix}_{name}_loss" if name else f"{metric_key_prefix}_loss"
            metrics[key] = mean_token_loss(self.model, dataset, self.data_collator, self.args.eval_batch_size)
        self.add_guarded_loss(metrics, metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def add_guarded_loss(self, metrics: dict[str, float], prefix: str) -> None:
        """The best-checkpoint metric under a forgetting limit: the domain loss while general loss is within
        the limit, infinite past it, so a checkpoint that forgot too much is never the one restored."""
        domain, general = metrics.get(f"{prefix}_domain_loss"), metrics.get(f"{prefix}_general_loss")
        if self.general_limit is None or domain is None or general is None:
            return
        metrics[f"{prefix}_guarded_domain_loss"] = domain if general <= self.general_limit else math.inf


def use_bf16(precision: str) -> bool:
    """fp32 on CPU: without AVX-512, bf16 matmuls there are 10-100x slower."""
    if precision == "fp32" or not torch.cuda.is_available():
        return False
    return precision == "bf16" or torch.cuda.is_bf16_supported()


def training_arguments(
    output_dir: str,
    *,
    epochs: float = 1.0,
    learning_rate: float,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
    precision: str,
    order: str = "sequential",
    **extra,
) -> TrainingArguments:
    """Stages train in the mix manifest's order (`sequential`: seeded upstream, so a resume continues the same
    sequence); pre-training shuffles (`random`)."""
    return TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=epochs,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=eval_batch_size,
        bf16=use_bf16(precision),
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        save_only_model=False,
        train_sampling_strategy=order,
        **extra,
    )

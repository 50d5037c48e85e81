"""What pre-training and every SFT/LoRA stage share: datasets of token ids, padding, the loss that
validation reports, and a transformers Trainer that evaluates with that same loss."""

from __future__ import annotations

import ctypes
import logging
import math
import os
import platform
import random
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments
from transformers.utils import logging as transformers_logging

from tasks.callbacks import LiveProgress
from tasks.checkpoints import CheckpointError, problem_with
from tasks.stage_time import EVALUATION, StageTime
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


MMAP_THRESHOLD = 128 * 1024
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def return_freed_buffers_to_the_system() -> None:
    """glibc serves every size it has freed from an mmapped buffer out of its heap from then on (its mmap
    threshold rises to that size, up to 32 MiB), and heap memory freed between live blocks stays with the
    process: a step's activations, freed after backward, left a LoRA stage's peak RSS at 1.6x its live tensors.
    A fixed threshold turns that rule off: buffers over 128 KiB get mappings of their own and go back to the
    system when freed (peak RSS over the estimate, d512x8: LoRA 1.59x -> 1.21x, full 1.24x -> 1.06x; step time
    unchanged within noise; benchmarks/train_speed.py)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # a libc without mallopt: its own allocator's behaviour stands
        return


return_freed_buffers_to_the_system()


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


TOKENS = "num_sample_tokens"  # a packed batch's real tokens: Trainer cannot tell its padding tail from samples


class PackCollator:
    """The batch's samples packed into as few rows of `row_len` tokens as fit (first fit, in order), each
    sample restarting its position ids: with no attention mask (and no cache), transformers reads sample
    boundaries from the position ids, so no attention and no position crosses a sample. The step sees the
    same samples and scores the same tokens as with PadCollator, without computing on padding.

    A sample's first label is never a target (the loss predicts token i+1 from tokens <= i); it is set to
    IGNORE so that the previous sample's last token does not learn to predict it."""

    def __init__(self, pad_id: int, row_len: int):
        self.pad_id, self.row_len = pad_id, row_len

    def rows(self, lengths: list[int]) -> list[list[int]]:
        rows, room = [], []
        for i, n in enumerate(lengths):
            fit = next((r for r, left in enumerate(room) if left >= n), None)
            if fit is None:
                fit = len(rows)
                rows.append([])
                room.append(max(self.row_len, n))  # a longer sample (not truncated upstream) gets a row of its own
            rows[fit].append(i)
            room[fit] -= n
        return rows

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        rows = self.rows([len(b["input_ids"]) for b in batch])
        width = max(sum(len(batch[i]["input_ids"]) for i in row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        positions = torch.arange(width).repeat(len(rows), 1)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                n = len(batch[i]["input_ids"])
                ids[r, start : start + n] = torch.tensor(batch[i]["input_ids"], dtype=torch.long)
                labels[r, start + 1 : start + n] = torch.tensor(batch[i]["labels"][1:], dtype=torch.long)
                positions[r, start : start + n] = torch.arange(n)
                start += n
            positions[r, start:] = torch.arange(width - start)  # the padding tail: a segment of its own
        tokens = sum(len(b["input_ids"]) for b in batch)  # an int: counting it needs no device round trip
        # A cache would switch transformers' packed-sequence detection off (masking_utils).
        return {"input_ids": ids, "labels": labels, "position_ids": positions, "use_cache": False, TOKENS: tokens}


GROUP_WINDOW = 64  # batches sorted together: tight grouping, while the stage's mix still changes every window


def length_grouped_order(lengths: list[int], batch_size: int, seed: int, window: int = GROUP_WINDOW) -> list[int]:
    """The stage's order with samples of similar length batched together: each window of `window` batches
    (in the stage's order) is sorted by length, longest first, cut into batches, and its full batches are
    shuffled; a short remainder stays last, so the batches of every window begin where the sampler cuts
    them. Padded to each batch's longest, a batch then computes little padding, and its attention stays as
    short as its samples (packed rows attend densely under a mask on CPU). A function of the lengths and
    the seed alone: a resumed stage sees the same batches."""
    shuffle = random.Random(seed).shuffle
    span, order = batch_size * window, []
    for start in range(0, len(lengths), span):
        members = sorted(range(start, min(start + span, len(lengths))), key=lambda i: -lengths[i])
        batches = [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
        full = [b for b in batches if len(b) == batch_size]
        shuffle(full)
        order += [i for batch in full + batches[len(full) :] for i in batch]
    return order


CHUNK_ELEMENTS = 1 << 24  # logits per loss chunk: 64 MB in fp32, whatever the batch and vocabulary


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of every labelled token (position i predicts label i+1), a slice of positions at a
    time: the full-vocabulary logits are held once, never copied shifted, upcast or log-softmaxed whole (a
    135M model's 49k vocabulary makes each such copy 0.8 GB for 16 x 256 tokens). While training, the loss's
    gradient is worked out in the same pass (LogitsBecomeTheirGradient)."""
    targets = labels[:, 1:].to(logits.device)
    if torch.is_grad_enabled() and logits.requires_grad:
        return LogitsBecomeTheirGradient.apply(logits, targets)
    total = logits.new_zeros((), dtype=torch.float32)
    for start, stop in position_slices(logits.shape):
        total = total + slice_loss(logits[:, start:stop], targets[:, start:stop])
    return total


def position_slices(shape: torch.Size) -> list[tuple[int, int]]:
    """Start and stop of each slice of the positions that predict a next token, CHUNK_ELEMENTS logits a slice."""
    rows, width, vocab = shape
    step = max(1, CHUNK_ELEMENTS // (rows * vocab))
    return [(start, min(start + step, width - 1)) for start in range(0, width - 1, step)]


def slice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    flat = logits.float().reshape(-1, logits.shape[-1])
    return torch.nn.functional.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE, reduction="sum")


class LogitsBecomeTheirGradient(torch.autograd.Function):
    """The summed token loss whose gradient (softmax less the one-hot target) is written, slice by slice, over
    the logits themselves in the forward pass, as Liger-Kernel's cross-entropy does on GPUs. Autograd's own
    backward through sliced logits held a gradient buffer of the logits' size plus, per slice, another
    full-size zero-filled one: 0.8 GB over the estimate for a 135M model's LoRA stage at 8 x 256 tokens.

    Nothing may read the logits after this loss: the training step drops the model's outputs before its
    backward pass. Anything in the graph that saved them fails loudly (the write bumps their version)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        grad = logits.detach()
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for start, stop in position_slices(logits.shape):
            wanted = targets[:, start:stop]
            scored = (wanted != IGNORE).unsqueeze(-1)
            index = wanted.clamp(min=0).unsqueeze(-1)
            log_probs = torch.log_softmax(grad[:, start:stop].float(), dim=-1)
            total -= log_probs.gather(-1, index).masked_fill(~scored, 0).sum()
            slice_grad = log_probs.exp_().scatter_add_(-1, index, torch.full_like(index, -1, dtype=log_probs.dtype))
            grad[:, start:stop] = slice_grad.masked_fill_(~scored, 0)
        grad[:, max(logits.shape[1] - 1, 0) :] = 0  # the last position predicts nothing
        ctx.grad = grad
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        if ctx.grad is None:
            raise RuntimeError("the token loss's gradient lives in its logits and can be taken once (no retain_graph)")
        grad, ctx.grad = ctx.grad, None
        return grad.mul_(grad_output.to(grad.dtype)), None


def mean_token_loss_of_step(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Trainer's `compute_loss_func`: the step's summed token loss over the labelled tokens of the whole
    (accumulated, all-device) batch, which Trainer counts, so the mean is the same as HF's own loss."""
    count = num_items_in_batch if num_items_in_batch is not None else (labels[:, 1:] != IGNORE).sum()
    return token_loss_sum(outputs.logits, labels) / count


def evaluation_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Sample indices in batches of similar length, shortest first, each holding as many samples as fit in
    `batch_size` samples of the set's longest: padded to its own longest, a batch computes almost no padding,
    and no batch needs more memory than `batch_size` of the longest would."""
    budget = batch_size * max(lengths, default=1)
    batches, current = [], []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if current and (len(current) + 1) * lengths[i] > budget:
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


@torch.no_grad()
def mean_token_loss(
    model,
    dataset: TokenDataset,
    collator: PadCollator | PackCollator,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> float:
    """Cross-entropy averaged over every labelled token of the set: the one validation loss mixtune reports.
    `on_batch` is told each batch's sample count (a progress bar).

    Averaging over tokens rather than over batches makes the number independent of batch size and order,
    so a reloaded checkpoint gives the logged value again, and the set can be read in length order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for indices in evaluation_batches([len(dataset[i]["input_ids"]) for i in range(len(dataset))], batch_size):
        batch = collator([dataset[i] for i in indices])
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k not in ("labels", TOKENS)}
        total += token_loss_sum(model(**inputs).logits, batch["labels"]).item()
        count += int((batch["labels"][:, 1:] != IGNORE).sum())
        if on_batch:
            on_batch(len(indices))
    model.train(was_training)
    if count == 0:  # a mean over nothing is no measurement: 0.0 here once let an untested model pass the gate
        raise ValueError(f"validation set of {len(dataset)} sample(s) holds no labelled token: no loss to report")
    return total / count


class TokenLossTrainer(Trainer):
    """Evaluates with mean_token_loss, so in-training curves, early stopping and final numbers agree."""

    def __init__(
        self,
        *args,
        general_limit: float | None = None,
        guarded_set: str = "general",
        clock: StageTime | None = None,
        **kwargs,
    ):
        super().__init__(*args, compute_loss_func=mean_token_loss_of_step, **kwargs)
        # ProgressCallback prints the same numbers as one readable line.
        self.remove_callback(PrinterCallback)
        self.general_limit, self.guarded_set = general_limit, guarded_set
        self.clock = clock or StageTime()

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:  # a step that raised never reaches on_train_end: a live bar must not outlive its training
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, LiveProgress):
                    callback.close()

    def _track_num_input_tokens(self, inputs):
        if TOKENS not in inputs:
            return super()._track_num_input_tokens(inputs)
        if self.accelerator.num_processes == 1:  # no host-device sync per step on a GPU
            self.state.num_input_tokens_seen += int(inputs[TOKENS])
            return
        tokens = torch.as_tensor(inputs[TOKENS], device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()

    def compute_loss(self, model, inputs, *args, **kwargs):
        inputs = {k: v for k, v in inputs.items() if k != TOKENS}
        return super().compute_loss(model, inputs, *args, **kwargs)

    def _save_checkpoint(self, *args, **kwargs):
        with self.clock.phase("checkpoints"):
            return super()._save_checkpoint(*args, **kwargs)

    def _load_best_model(self) -> None:
        """Trainer loads the best checkpoint as it finds it; a damaged one must stop the stage, not become it.
        When the best is the checkpoint just written from the weights in memory, they are kept as they are."""
        with self.clock.phase("best model load"):
            if Path(self.state.best_model_checkpoint).name == f"checkpoint-{self.state.global_step}":
                return
            reason = problem_with(self.state.best_model_checkpoint)
            if reason:
                raise CheckpointError(f"the best checkpoint cannot be trusted: {reason}")
            super()._load_best_model()

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        sets = eval_dataset if eval_dataset is not None else self.eval_dataset
        if not isinstance(sets, dict):
            sets = {"": sets}
        # Padded, not packed: length-ordered batches hold next to no padding, and each sample attends over its
        # own length only (a packed row attends densely under a mask on CPU).
        padded = PadCollator(self.data_collator.pad_id)
        metrics = {}
        with self.clock.phase(EVALUATION):
            for name, dataset in sets.items():
                key = f"{metric_key_prefix}_{name}_loss" if name else f"{metric_key_prefix}_loss"
                metrics[key] = mean_token_loss(self.model, dataset, padded, self.args.eval_batch_size)
        self.add_guarded_loss(metrics, metric_key_prefix)
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def add_guarded_loss(self, metrics: dict[str, float], prefix: str) -> None:
        """The best-checkpoint metric under a forgetting limit: the domain loss while general loss is within
        the limit, infinite past it, so a checkpoint that forgot too much is never the one restored."""
        domain, general = metrics.get(f"{prefix}_domain_loss"), metrics.get(f"{prefix}_{self.guarded_set}_loss")
        if self.general_limit is None or domain is None or general is None:
            return
        metrics[f"{prefix}_guarded_domain_loss"] = domain if general <= self.general_limit else math.inf


def world_rank() -> int:
    """This process's rank among the processes torchrun started (0 when training alone)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


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

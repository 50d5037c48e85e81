"""Training speed on real SFT rows: a mixtune step (packed, and padded to the batch's longest) against a
MiniMind-style step that pads every sample to 768 tokens, and against a bare transformers
forward/backward/AdamW loop on the very same packed batches; model FLOPs/s against an fp32 matmul ceiling
measured in the same run.

    python benchmarks/train_speed.py [--data ../shared/data/domain_med_zh_huatuo.alpaca.jsonl]
                                     [--batch 8] [--steps 3] [--repeats 3]

The model is MiniMind's d512x8 shape (8 heads, 4 KV heads, FFN 1664, vocab 6400, tied) on Llama classes,
with a 6,400-token BPE trained here on the same rows (MiniMind's own tokenizer is not loaded: no hub).
Arms run interleaved, `repeats` times, one process; medians. Figures are ratios from this run only: the
machine is shared and noisy. Not measured here yet: peak RSS per stage, `mixtune run` overhead, GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MINIMIND_LEN = 768


def load_rows(path: Path, n: int) -> list[list[dict]]:
    conversations = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            prompt = (row["instruction"] + ("\n" + row["input"] if row.get("input") else "")).strip()
            conversations.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}])
            if len(conversations) == n:
                break
    return conversations


def encode(conversations: list[list[dict]], folder: Path) -> list[dict]:
    from tasks.base_model import train_tokenizer
    from tasks.tokenize import Encoder

    texts = [turn["content"] for c in conversations for turn in c]
    tokenizer = train_tokenizer(texts, 6400, folder)
    pairs = Encoder(tokenizer).conversations(conversations)
    return [{"input_ids": ids[:MINIMIND_LEN], "labels": labels[:MINIMIND_LEN]} for ids, labels in pairs]


def build_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=6400,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1664,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
        attn_implementation="sdpa",
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def pad_to(batch: list[dict], width: int) -> dict:
    import torch

    from tasks.tables import IGNORE

    ids = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[r, :n], labels[r, :n], mask[r, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def timed_steps(model, optimizer, batches: list[dict]) -> list[float]:
    times = []
    for batch in batches:
        batch = {k: v for k, v in batch.items() if k != "num_sample_tokens"}
        started = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return times


def trainer_steps(model, samples: list[dict], batch: int, steps: int, packing: bool, folder: str) -> list[float]:
    """mixtune's own path: TokenLossTrainer with its collator, timed per optimiser step by a callback."""
    from transformers import TrainerCallback

    from tasks.lm import PackCollator, PadCollator, TokenLossTrainer, training_arguments
    from tasks.tables import TokenDataset

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.started = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.started)

    timer = StepTimer()
    collator = PackCollator(0, MINIMIND_LEN) if packing else PadCollator(0)
    args = training_arguments(
        folder,
        learning_rate=1e-4,
        batch_size=batch,
        eval_batch_size=batch,
        seed=0,
        precision="fp32",
        max_steps=steps,
        save_strategy="no",
        logging_steps=10_000,
    )
    data = TokenDataset({"input_ids": [s["input_ids"] for s in samples], "labels": [s["labels"] for s in samples]})
    TokenLossTrainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=[timer]).train()
    return timer.times[1:] or timer.times  # the first step pays for optimizer state


def matmul_ceiling(size: int = 1024, repeats: int = 10) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(timeit(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def timeit(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def model_flops(params: int, tokens: int) -> float:
    return 6 * params * tokens  # forward + backward, attention left out (short rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/domain_med_zh_huatuo.alpaca.jsonl"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    from tasks.lm import PackCollator

    work = Path(tempfile.mkdtemp(prefix="mixtune-speed-"))
    samples = encode(load_rows(Path(args.data), 2000), work / "tokenizer")
    chosen = samples[: args.batch * (args.steps + 1)]
    chunks = [chosen[i : i + args.batch] for i in range(0, len(chosen), args.batch)]
    real_tokens = sum(len(s["input_ids"]) for s in chosen[args.batch :])
    label_tokens = sum(sum(t != -100 for t in s["labels"][1:]) for s in chosen[args.batch :])
    arms = {"minimind pad-768": [], "mixtune padded": [], "mixtune packed": [], "bare loop, packed batches": []}
    params = sum(p.numel() for p in build_model().parameters())
    for _ in range(args.repeats):
        for arm in arms:
            model = build_model()
            if arm == "minimind pad-768":
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                times = timed_steps(model, optimizer, [pad_to(c, MINIMIND_LEN) for c in chunks])[1:]
            elif arm == "bare loop, packed batches":
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                times = timed_steps(model, optimizer, [PackCollator(0, MINIMIND_LEN)(c) for c in chunks])[1:]
            else:
                times = trainer_steps(
                    model, chosen, args.batch, args.steps + 1, arm.endswith("packed"), str(work / arm)
                )
            arms[arm].append(sum(times))
    ceiling = matmul_ceiling()
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; d512x8 "
        f"({params / 1e6:.1f}M params), batch {args.batch}, {args.steps} timed steps x {args.repeats} repeats; "
        f"mean sample {real_tokens / (args.batch * args.steps):.0f} tokens; fp32 matmul ceiling "
        f"{ceiling / 1e9:.0f} GFLOP/s"
    )
    base = statistics.median(arms["minimind pad-768"])
    header = ("arm", "s/step", "samples/s", "label tok/s", "vs minimind", "GFLOP/s", "of ceiling")
    print(f"{header[0]:28} " + " ".join(f"{h:>12}" for h in header[1:]))
    for arm, totals in arms.items():
        seconds = statistics.median(totals)
        flops = model_flops(params, real_tokens) / seconds
        cells = (seconds / args.steps, args.batch * args.steps / seconds, label_tokens / seconds)
        print(
            f"{arm:28} {cells[0]:12.2f} {cells[1]:12.2f} {cells[2]:12.0f} {base / seconds:11.2f}x "
            f"{flops / 1e9:12.1f} {flops / ceiling:12.0%}"
        )
    trainer, bare = statistics.median(arms["mixtune packed"]), statistics.median(arms["bare loop, packed batches"])
    print(f"mixtune packed step vs bare loop on the same batches: {bare / trainer:.0%} of its speed (goal >= 95%)")
    print(f"upper bound of packing vs pad-768 (768 / mean tokens): {768 * args.batch * args.steps / real_tokens:.1f}x")


if __name__ == "__main__":
    main()

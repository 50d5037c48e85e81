"""Training speed and memory on real SFT rows, and what a whole `mixtune run` costs around its training steps.

    python benchmarks/train_speed.py [--data ../shared/data/domain_med_zh_huatuo.alpaca.jsonl]
                                     [--batch 8] [--steps 8] [--repeats 3] [--packed-rows 768 256]
                                     [--minimind DIR --minimind-python PY]
                                     [--memory-batch 8] [--memory-seq 256] [--memory-steps 3]
                                     [--run-minutes 5] [--quick] [--skip-memory | --memory-only | --speed-only]

--batch/--steps/--repeats: the speed arms (samples per step, timed steps after one untimed, repeats).
--packed-rows: the row lengths of the packed arms.
--minimind: a checkout of github jingyaogong/minimind (outside this repository); --minimind-python: the
    interpreter of its own environment (its requirements; torch from anywhere). Its real trainer becomes an arm.
--memory-*: samples per step, tokens per sample and steps of each peak-RSS stage.
--run-minutes: how long the `mixtune run` stage should train (sized from the default batching's samples/s).
--quick: a smoke test of every part at toy sizes (batch 2, 1 step, 1 repeat; memory stages of 2 x 32 tokens, the
    135M shape with 2 of its 30 layers; a 3-step `mixtune run` on 600 rows): it checks that everything runs, its
    figures mean nothing.

1. Speed. mixtune steps (TokenLossTrainer with the stage's collator) for each `train.batching`: grouped (the
   timed batches sorted by length as one window, then shuffled), padded to the batch's longest in the rows'
   order, and packed into rows of each --packed-rows length; against MiniMind: its real
   trainer/train_full_sft.py when --minimind is given (run in its own process and environment: d512x8 from
   random weights, batch 8, max length 768, fp32 on CPU, one epoch over the same rows in its SFT format; its
   steps after the first, timed between its per-step log lines), and an in-process imitation that pads every
   sample to 768 tokens; and a bare transformers forward/backward/AdamW loop on the default batching's
   batches; model FLOPs/s against an fp32 matmul ceiling measured in the same run. Every arm trains the same
   samples. The model is MiniMind's d512x8 shape (8 heads, 4 KV heads, FFN 1664, vocab 6400, tied) on Llama
   classes, with MiniMind's own tokenizer read from the checkout's model/ folder when --minimind is given
   (the same tokens as MiniMind), else a 6,400-token BPE trained here on the same rows. Arms run
   interleaved, `repeats` times; medians.
2. Peak RSS. A full and a LoRA stage of the d512x8 shape and of a SmolLM-135M shape (hidden 576, 30 layers,
   9 heads, 3 KV heads, FFN 1536, vocab 49,152, tied; random weights, random token ids: only ids matter),
   each in a fresh subprocess, through mixtune's own path: the model saved as a folder and loaded by
   tasks/train.py load_for_training (LoRA with the config's defaults), TokenLossTrainer, training_arguments
   and PackCollator (one sample per row), MemoryPeak reading VmHWM. Measured: the stage's peak RSS
   (MemoryPeak's `peak_rss_mb`) less the process's RSS before the model was loaded (interpreter, torch,
   transformers, peft, mixtune). Estimate: fp32 weights (all parameters) + gradients and AdamW's two
   moments (trainable parameters, 3 x 4 bytes) + one batch of activations, which is the bytes of every
   distinct tensor autograd saves for backward in one forward pass of the same batch (counted with
   saved_tensors_hooks, parameters excluded) plus the fp32 full-vocabulary logits once (the training loss
   writes their gradient over them: no second buffer of their size). --memory-only runs this part alone.
3. `mixtune run` overhead. A whole `mixtune run` in a subprocess of a config with one full SFT stage on the
   same rows (half as domain, half as general), the d512x8 model from a local folder (`model.path`: no
   pre-training), batch 8, max_seq_len 768, the default batching, a progress line every step, evaluation only at the
   stage's end. Cold: a fresh output folder, with the ingest, tokens and base-model evaluation that an
   earlier short run in another folder left in a shared cache (MIXTUNE_CACHE_DIR), as any user has them
   after a first run. Its training-step time is the stage's steps x the median time between its progress
   lines, as they arrive; overhead is wall time over that, less 1. Time to the first step: the arrival of
   step 1's line (the step's end: steps differ too much under load to subtract one). The train task's own
   split of its time (tasks/stage_time.py: steps, evaluation, model load, trainer set-up, checkpoints,
   best-model load, final model, MLflow, other).
4. Evaluation cost. Validation's loss pass (length-ordered batches padded to their own longest, as many
   samples as fit in validation.batch_size of the set's longest) against the training forward pass alone
   (packed rows of 768, batch 8, no gradient) and against validation as it read its sets before (in order,
   32 at a time), on the same model and 300 Huatuo samples; tokens/s, interleaved, medians.

Figures are ratios from this run only: the machine is shared and noisy. Not measured here: GPU (no GPU on
the machines this was written on).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def encode(conversations: list[list[dict]], folder: Path, minimind: Path | None = None) -> list[dict]:
    """Token ids through mixtune's Encoder: with MiniMind's own tokenizer (its repository's model/ folder, read
    from disk) when a MiniMind checkout is given, else a 6,400-token BPE trained here on the same rows. Either
    way the tokenizer is saved to `folder`."""
    from transformers import AutoTokenizer

    from tasks.base_model import train_tokenizer
    from tasks.tokenize import Encoder

    if minimind:
        tokenizer = AutoTokenizer.from_pretrained(minimind / "model", trust_remote_code=False)
        tokenizer.save_pretrained(folder)
    else:
        texts = [turn["content"] for c in conversations for turn in c]
        tokenizer = train_tokenizer(texts, 6400, folder)
    pairs = Encoder(tokenizer).conversations(conversations)
    return [{"input_ids": ids[:MINIMIND_LEN], "labels": labels[:MINIMIND_LEN]} for ids, labels in pairs]


D512 = dict(
    hidden_size=512,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    intermediate_size=1664,
    vocab_size=6400,
)
SMOL_135M = dict(
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    intermediate_size=1536,
    vocab_size=49152,
)


def build_model(shape: dict = D512):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        **shape,
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


def trainer_steps(model, samples: list[dict], batch: int, steps: int, collator, folder: str) -> list[float]:
    """mixtune's own path: TokenLossTrainer with the stage's collator over `samples` in the order given (as a
    stage's sampler reads them), timed per optimiser step by a callback."""
    from transformers import TrainerCallback

    from tasks.lm import TokenLossTrainer, training_arguments
    from tasks.tables import TokenDataset

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.started = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.started)

    timer = StepTimer()
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


def goal(name: str, measured: str, target: str, met: bool) -> None:
    print(f"goal {name}: measured {measured} (goal {target}) {'MET' if met else 'NOT MET'}")


# ---- 2. Peak RSS of a stage, each in a fresh process ----


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def stage_config(method: str, model_dir: str):
    from mixtune.core.config import validate_config

    raw = {
        "data": {"sources": [{"synthetic": "general", "role": "general"}, {"synthetic": "domain", "role": "domain"}]},
        "model": {"path": model_dir},
        "train": {"method": method},
    }
    return validate_config(raw, "benchmark stage", base_dir=Path(model_dir))


def saved_activation_bytes(model, batch: dict) -> tuple[int, int]:
    """Bytes of the distinct tensors autograd saves for backward in one forward pass (parameters left out), and
    of the fp32 logits that pass produces."""
    import torch

    from tasks.lm import TOKENS

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    inputs = {k: v for k, v in batch.items() if k not in ("labels", TOKENS)}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(**inputs).logits
    return sum(saved.values()), logits.numel() * logits.element_size()


def memory_child(spec: dict) -> None:
    """One stage in this (fresh) process; prints one JSON line."""
    import torch

    from tasks.callbacks import MemoryPeak
    from tasks.lm import PackCollator, TokenLossTrainer, training_arguments
    from tasks.tables import TokenDataset
    from tasks.train import load_for_training

    runtime = rss_mb()
    model = load_for_training(stage_config(spec["method"], spec["folder"]), spec["folder"], spec["folder"])
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    generator = torch.Generator().manual_seed(0)
    n, seq = spec["batch"] * spec["steps"], spec["seq"]
    ids = torch.randint(3, spec["vocab"], (n, seq), generator=generator).tolist()
    data = TokenDataset({"input_ids": ids, "labels": ids})
    collator = PackCollator(0, seq)  # one sample per row: batch x seq tokens a step
    args = training_arguments(
        spec["out"],
        learning_rate=1e-4,
        batch_size=spec["batch"],
        eval_batch_size=spec["batch"],
        seed=0,
        precision="fp32",
        max_steps=spec["steps"],
        save_strategy="no",
        logging_steps=10_000,
    )
    peak: dict = {}
    logged: list[str] = []
    callbacks = [MemoryPeak(lambda metrics, step: peak.update(metrics), logged.append)]
    loaded = rss_mb()
    TokenLossTrainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=callbacks).train()
    activations, logits = saved_activation_bytes(model, collator([data[i] for i in range(spec["batch"])]))
    result = {
        "runtime_mb": runtime,
        "loaded_mb": loaded,
        "peak_rss_mb": peak["peak_rss_mb"],
        "since_stage_start": "this stage" in logged[0],
        "weights": weights,
        "trainable": trainable,
        "activations": activations,
        "logits": logits,
        "params": sum(p.numel() for p in model.parameters()),
    }
    print("MEMORY " + json.dumps(result), flush=True)


def memory_stage(shape_name: str, shape: dict, method: str, folder: Path, args) -> dict:
    import subprocess

    spec = {
        "method": method,
        "folder": str(folder),
        "out": str(folder.parent / f"out-{shape_name}-{method}"),
        "batch": args.memory_batch,
        "seq": args.memory_seq,
        "steps": args.memory_steps,
        "vocab": shape["vocab_size"],
    }
    done = subprocess.run(
        [sys.executable, __file__, "--memory-child", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("MEMORY ")]
    if done.returncode or not lines:
        raise RuntimeError(f"memory stage {shape_name} {method} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("MEMORY ") :])


def memory_part(work: Path, args) -> None:
    smol = dict(SMOL_135M, num_hidden_layers=2) if args.quick else SMOL_135M
    shapes = {"d512x8": D512, "135M-shape" if not args.quick else "135M-shape (2 of 30 layers)": smol}
    tokens = args.memory_batch * args.memory_seq
    print(
        f"\npeak RSS per stage (fresh process each; batch {args.memory_batch} x {args.memory_seq} tokens, "
        f"{args.memory_steps} steps, fp32, AdamW; LoRA r/alpha/dropout/targets: mixtune's defaults)"
    )
    header = ("stage", "params", "runtime", "loaded", "peak", "stage", "weights", "grad+adam", "activ.", "logits")
    print(f"{header[0]:34} " + " ".join(f"{h:>10}" for h in header[1:]))
    results = []
    for name, shape in shapes.items():
        folder = work / f"model-{name.split()[0]}"
        build_model(shape).save_pretrained(folder)
        for method in ("full", "lora"):
            r = memory_stage(name.split()[0], shape, method, folder, args)
            own = r["peak_rss_mb"] - r["runtime_mb"]
            parts = [r["weights"], 3 * r["trainable"], r["activations"], r["logits"]]
            estimate = sum(parts) / 2**20
            label = f"{name} {method}"
            cells = [r["params"] / 1e6, r["runtime_mb"], r["loaded_mb"], r["peak_rss_mb"], own]
            cells += [x / 2**20 for x in parts]
            print(f"{label:34} {cells[0]:9.1f}M " + " ".join(f"{c:10,.0f}" for c in cells[1:]))
            if not r["since_stage_start"]:
                print(f"  ({label}: VmHWM could not be reset at the stage's start; the peak includes loading)")
            results.append((label, own, estimate, r["peak_rss_mb"] / (r["runtime_mb"] + estimate)))
    print(
        f"(MB of 2^20 bytes. runtime: RSS before the model is loaded; loaded: after; peak: the stage's peak_rss_mb; "
        f"stage: peak less runtime; the rest: the estimate's parts; {tokens:,} tokens a step)"
    )
    for label, own, estimate, whole in results:
        ratio = own / estimate
        goal(
            f"peak RSS, {label}",
            f"{ratio:.2f}x of the estimate ({own:,.0f} of {estimate:,.0f} MB; with the runtime in both: {whole:.2f}x)",
            "<= 1.5x",
            ratio <= 1.5,
        )


# ---- 3. `mixtune run` overhead ----


def run_inputs(work: Path, rows: Path, tokenizer_dir: Path, quick: bool) -> Path:
    """Half the rows as the domain source, half as the general one; the d512x8 model as a local folder."""
    lines = rows.read_text(encoding="utf-8").splitlines()
    if quick:
        lines = lines[:600]
    half = len(lines) // 2
    (work / "domain.jsonl").write_text("\n".join(lines[:half]) + "\n", encoding="utf-8")
    (work / "general.jsonl").write_text("\n".join(lines[half:]) + "\n", encoding="utf-8")
    model_dir = work / "run-model"
    build_model().save_pretrained(model_dir)
    for file in tokenizer_dir.iterdir():
        (model_dir / file.name).write_bytes(file.read_bytes())
    return model_dir


def run_config(work: Path, model_dir: Path, output: str, samples: int, quick: bool) -> Path:
    """A progress line (and an MLflow record) every step: the first one dates the first step."""
    import yaml

    never = 1_000_000  # evaluate at the stage's end only
    val = {"max_val_samples": 20} if quick else {}
    config = {
        "run": {"name": "speed", "output_dir": str(work / output), "seed": 0},
        "data": {
            "sources": [
                {"path": str(work / "domain.jsonl"), "role": "domain", **val},
                {"path": str(work / "general.jsonl"), "role": "general", **val},
            ]
        },
        "model": {"path": str(model_dir), "max_seq_len": MINIMIND_LEN},
        "pretrain": {"enabled": False},
        "schedule": {"start": 0.5, "end": 0.5, "stages": 1, "samples_per_stage": samples},
        "train": {"method": "full", "batch_size": 8, "precision": "fp32", "logging_steps": 1},
        "validation": {"eval_steps": never, "first_eval_step": never},
        "tracking": {"experiment": "train-speed"},
    }
    path = work / f"{output}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def timed_run(config: Path, cache: Path) -> tuple[float, list[tuple[float, str]]]:
    """`mixtune run` in a fresh process: its wall time, and each output line with the second it arrived."""
    import subprocess

    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "MIXTUNE_CACHE_DIR": str(cache),
    }
    command = [sys.executable, "-c", "import sys; from mixtune.cli import main; sys.exit(main())", "run", str(config)]
    started, lines = time.perf_counter(), []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as child:
        for line in child.stdout:
            lines.append((time.perf_counter() - started, line.rstrip()))
    wall = time.perf_counter() - started
    if child.returncode:
        tail = "\n".join(text for _, text in lines[-40:])
        raise RuntimeError(f"mixtune run failed (exit {child.returncode}):\n{tail}")
    return wall, lines


def stage_phases(lines: list[tuple[float, str]]) -> tuple[dict[str, float], float]:
    """The train task's own split of its wall time (tasks/stage_time.py's closing line), and that wall time."""
    import re

    for _, text in lines:
        if m := re.search(r"stage 1 time: (.+?); outside steps and evaluation [\d.]+ s of ([\d.]+) s", text):
            phases = {name: float(sec) for name, sec in re.findall(r"([a-zA-Z -]+?) ([\d.]+) s(?:,|$)", m.group(1))}
            return {name.strip(): sec for name, sec in phases.items()}, float(m.group(2))
    raise RuntimeError("mixtune run logged no `stage 1 time:` line")


def run_part(work: Path, args, tokenizer_dir: Path, samples_per_second: float) -> None:
    samples = max(24, round(args.run_minutes * 60 * samples_per_second * 1.25 / 8) * 8)
    model_dir, cache = run_inputs(work, Path(args.data), tokenizer_dir, args.quick), work / "shared-cache"
    # An earlier run in another output folder fills the shared cache (ingest, tokens, base-model evaluation):
    # the timed run is cold in its own folder, with the cached baseline a user has from any earlier run.
    timed_run(run_config(work, model_dir, "run-earlier", 24, args.quick), cache)
    cold_run(work, model_dir, cache, samples, args)


def cold_run(work: Path, model_dir: Path, cache: Path, samples: int, args) -> None:
    import re

    wall, lines = timed_run(run_config(work, model_dir, "run-out", samples, args.quick), cache)
    log = Path(tempfile.mkstemp(prefix="mixtune-speed-run-", suffix=".log")[1])
    log.write_text("".join(f"{t:9.3f} {text}\n" for t, text in lines), encoding="utf-8")
    progress = [
        (t, int(m.group(1)), int(m.group(2)))
        for t, text in lines
        if (m := re.search(r"stage 1 step (\d+)/(\d+) loss ", text))
    ]
    if len(progress) < 2:
        raise RuntimeError("mixtune run logged fewer than two progress lines: give a longer stage (--run-minutes)")
    per_step = statistics.median((t1 - t0) / (k1 - k0) for (t0, k0, _), (t1, k1, _) in zip(progress, progress[1:]))
    steps = progress[-1][2]
    training = steps * per_step
    first = progress[0][0]  # step 1's line: its end, so the goal is judged on an upper bound
    finished = [
        (t, m.group(1))
        for t, text in lines
        if (m := re.search(r"^(?:\d\d:\d\d:\d\d(?:\.\d+)? )?(.+?) \| Finished in state", text))
    ]
    print(
        f"\nmixtune run: one full SFT stage of {samples} samples ({steps} steps of 8, the default "
        f"train.batching, max_seq_len {MINIMIND_LEN}), d512x8 from model.path, evaluation at the stage's end only; "
        "cold (fresh output folder), "
        "the base model's evaluation cached by an earlier run in another folder (MIXTUNE_CACHE_DIR)"
    )
    print(
        f"wall {wall:.1f} s; training steps {training:.1f} s ({steps} x median {per_step:.3f} s/step from "
        f"{len(progress)} progress lines); outside them {wall - training:.1f} s"
    )
    print(f"its output, each line with the second it arrived: {log}")
    print("tasks (s since start, as each finished): " + ", ".join(f"{name} {t:.1f}" for t, name in finished))
    phases, stage_wall = stage_phases(lines)
    around = {name: sec for name, sec in phases.items() if name not in ("steps", "evaluation")}
    print(
        f"the train task's {stage_wall:.1f} s: "
        + ", ".join(f"{name} {sec:.1f} s ({sec / stage_wall:.1%})" for name, sec in phases.items())
    )
    if training < 300 and not args.quick:
        print(f"(the stage trained {training / 60:.1f} min, under the 5 minutes the goals ask: raise --run-minutes)")
    overhead = wall / training - 1
    goal(
        "mixtune run overhead",
        f"{overhead:.1%} over {training / 60:.1f} min of training steps",
        "<= 3%",
        overhead <= 0.03,
    )
    share = sum(around.values()) / stage_wall
    measured = f"{share:.1%} of its {stage_wall:.0f} s"
    goal("train task outside its steps and evaluations", measured, "<= 3%", share <= 0.03)
    goal("time to the end of the first training step (cold, cached baseline)", f"{first:.1f} s", "<= 20 s", first <= 20)


# ---- 4. Evaluation cost ----


def evaluation_part(work: Path, args) -> None:
    """Validation's mean_token_loss (length-ordered padded batches of validation.batch_size's tokens) against the
    training forward pass alone (packed rows of 768, no gradient) and against validation as it read its sets
    before (dataset order, 32 samples padded to the batch's longest), on the same model and samples."""
    import torch

    from tasks.lm import PackCollator, PadCollator, mean_token_loss
    from tasks.tables import TokenDataset

    samples = encode(load_rows(Path(args.data), 100 if args.quick else 300), work / "eval-tokenizer")
    tokens = sum(len(s["input_ids"]) for s in samples)
    dataset = TokenDataset({"input_ids": [s["input_ids"] for s in samples], "labels": [s["labels"] for s in samples]})
    model = build_model().eval()

    @torch.no_grad()
    def forward_only(collator, batch: int) -> None:
        for start in range(0, len(samples), batch):
            inputs = collator(samples[start : start + batch])
            model(**{k: v for k, v in inputs.items() if k not in ("labels", "num_sample_tokens")})

    arms = {
        "training forward only (packed, batch 8)": lambda: forward_only(PackCollator(0, MINIMIND_LEN), args.batch),
        "validation before (in order, batch 32)": lambda: forward_only(PadCollator(0), 32),
        "validation (length-ordered, 32 x longest)": lambda: mean_token_loss(model, dataset, PadCollator(0), 32),
    }
    seconds = {arm: [] for arm in arms}
    for _ in range(args.repeats):
        for arm, run in arms.items():
            seconds[arm].append(timeit(run))
    rates = {arm: tokens / statistics.median(times) for arm, times in seconds.items()}
    print(f"\nevaluation cost: d512x8, {len(samples)} samples ({tokens:,} tokens), medians of {args.repeats}")
    for arm, rate in rates.items():
        print(f"  {arm:44} {rate:10.0f} tokens/s")
    train, now = rates["training forward only (packed, batch 8)"], rates["validation (length-ordered, 32 x longest)"]
    goal("validation tokens/s vs forward-only training tokens/s", f"{now / train:.2f}x", ">= 1x", now >= train)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/domain_med_zh_huatuo.alpaca.jsonl"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-batch", type=int, default=8)
    parser.add_argument("--memory-seq", type=int, default=256)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--run-minutes", type=float, default=5.0)
    parser.add_argument(
        "--packed-rows", type=int, nargs="+", default=[MINIMIND_LEN, 256], help="row lengths of the packed arms"
    )
    parser.add_argument(
        "--minimind", help="a MiniMind checkout (github jingyaogong/minimind): its real trainer becomes an arm"
    )
    parser.add_argument(
        "--minimind-python", default=sys.executable, help="the interpreter of MiniMind's own environment"
    )
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks that every part runs")
    parser.add_argument(
        "--skip-memory", action="store_true", help="leave out the peak-RSS part (its figures do not depend on load)"
    )
    parser.add_argument(
        "--memory-only", action="store_true", help="the peak-RSS part alone (no speed arms, no `mixtune run`)"
    )
    parser.add_argument("--speed-only", action="store_true", help="the speed arms alone (part 1)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(json.loads(args.memory_child))
        return
    if args.quick:
        args.batch, args.steps, args.repeats = 2, 1, 1
        args.memory_batch, args.memory_seq, args.memory_steps = 2, 32, 2
        args.run_minutes = 0.0
    work = Path(tempfile.mkdtemp(prefix="mixtune-speed-"))
    started = time.perf_counter()
    try:
        if args.memory_only:
            memory_part(work, args)
            return
        samples_per_second = speed_part(work, args)
        print(f"(speed part: {time.perf_counter() - started:.0f} s so far)")
        if args.speed_only:
            return
        if not args.skip_memory:
            memory_part(work, args)
            print(f"(memory part: {time.perf_counter() - started:.0f} s so far)")
        run_part(work, args, work / "tokenizer", samples_per_second)
        evaluation_part(work, args)
        print(f"(whole benchmark: {time.perf_counter() - started:.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)  # models of 0.1-0.5 GB each


def speed_part(work: Path, args) -> float:
    """Prints the speed table and its goals; returns the samples/s of the default batching (sizes the run's
    stage). Every arm trains the same samples: one untimed batch, then `steps` timed ones, each arm batching
    them its own way."""
    import torch

    from mixtune.core.config import Train
    from tasks.lm import PackCollator, PadCollator, length_grouped_order

    minimind = Path(args.minimind).resolve() if args.minimind else None
    conversations = load_rows(Path(args.data), 200 if args.quick else 2000)
    samples = encode(conversations, work / "tokenizer", minimind)
    pad_id = tokenizer_pad_id(work / "tokenizer")
    chosen = samples[: args.batch * (args.steps + 1)]
    first, timed = chosen[: args.batch], chosen[args.batch :]
    real_tokens = sum(len(s["input_ids"]) for s in timed)
    label_tokens = sum(sum(t != -100 for t in s["labels"][1:]) for s in timed)
    # The whole timed set is one grouping window: `steps` batches, not a stage's 64 (grouping is no tighter here).
    grouped = [timed[i] for i in length_grouped_order([len(s["input_ids"]) for s in timed], args.batch, 0, args.steps)]
    default = Train().batching
    mixtune_arms = {
        "mixtune grouped": (grouped, PadCollator(pad_id)),
        "mixtune padded": (timed, PadCollator(pad_id)),
        **{f"mixtune packed {n}": (timed, PackCollator(pad_id, n)) for n in args.packed_rows},
    }
    default_arm = f"mixtune {default}" if default != "packed" else f"mixtune packed {MINIMIND_LEN}"
    bare_order, bare_collator = mixtune_arms[default_arm]
    real_arm, imitation_arm, bare_arm = "minimind real trainer", "minimind pad-768 imitation", f"bare loop, {default}"
    arms = {**({real_arm: []} if minimind else {}), imitation_arm: [], **{a: [] for a in mixtune_arms}, bare_arm: []}
    if minimind:
        minimind_data = work / "minimind-sft.jsonl"
        write_minimind_sft(conversations[: len(chosen)], minimind_data)
    params = sum(p.numel() for p in build_model().parameters())
    for _ in range(args.repeats):
        for arm in arms:
            if arm == real_arm:
                arms[arm].append(minimind_seconds(minimind, args, minimind_data, work))
                continue
            model = build_model()
            if arm in mixtune_arms:
                order, collator = mixtune_arms[arm]
                arms[arm].append(
                    sum(trainer_steps(model, first + order, args.batch, args.steps + 1, collator, str(work / arm)))
                )
                continue
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            if arm == imitation_arm:
                batches = [pad_to(c, MINIMIND_LEN) for c in chunked(first + timed, args.batch)]
            else:
                batches = [bare_collator(c) for c in chunked(first + bare_order, args.batch)]
            arms[arm].append(sum(timed_steps(model, optimizer, batches)[1:]))
    ceiling = matmul_ceiling()
    tokenizer_name = (
        "MiniMind's own tokenizer (model/ of the checkout)" if minimind else "a 6,400-token BPE trained here"
    )
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; d512x8 "
        f"({params / 1e6:.1f}M params), {tokenizer_name}; batch {args.batch}, {args.steps} timed steps x "
        f"{args.repeats} repeats, interleaved, medians; mean sample {real_tokens / (args.batch * args.steps):.0f} "
        f"tokens; fp32 matmul ceiling {ceiling / 1e9:.0f} GFLOP/s; load average {load_average()}"
    )
    if not minimind:
        print("MiniMind's real trainer not given (--minimind DIR): the in-process pad-768 imitation stands in")
    baselines = [a for a in (real_arm, imitation_arm) if a in arms]
    header = (
        "arm",
        "s/step",
        "samples/s",
        "label tok/s",
        *(f"vs {b.split()[1]}" for b in baselines),
        "GFLOP/s",
        "of ceiling",
    )
    print(f"{header[0]:30} " + " ".join(f"{h:>12}" for h in header[1:]))
    for arm, totals in arms.items():
        seconds = statistics.median(totals)
        flops = model_flops(params, real_tokens) / seconds
        ratios = " ".join(f"{statistics.median(arms[b]) / seconds:11.2f}x" for b in baselines)
        print(
            f"{arm:30} {seconds / args.steps:12.2f} {args.batch * args.steps / seconds:12.2f} "
            f"{label_tokens / seconds:12.0f} {ratios} {flops / 1e9:12.1f} {flops / ceiling:12.0%}"
        )
    chosen_seconds, bare = statistics.median(arms[default_arm]), statistics.median(arms[bare_arm])
    fastest = min(mixtune_arms, key=lambda a: statistics.median(arms[a]))
    print(f"fastest batching here: {fastest}; the default (train.batching: {default}) is {default_arm}")
    base_arm = baselines[0]
    base = statistics.median(arms[base_arm])
    limit = MINIMIND_LEN * args.batch * args.steps / real_tokens
    goal(
        f"samples/s, {default_arm} vs {base_arm}",
        f"{base / chosen_seconds:.2f}x (limit 768 / mean tokens = {limit:.1f}x)",
        ">= 7x",
        base / chosen_seconds >= 7,
    )
    goal(
        f"{default_arm} step vs bare loop on the same batches",
        f"{bare / chosen_seconds:.0%} of its speed",
        ">= 95%",
        bare / chosen_seconds >= 0.95,
    )
    used = model_flops(params, real_tokens) / chosen_seconds / ceiling
    goal(f"model FLOP/s of {default_arm} vs the fp32 matmul ceiling", f"{used:.0%}", ">= 70%", used >= 0.7)
    return args.batch * args.steps / chosen_seconds


def chunked(samples: list[dict], size: int) -> list[list[dict]]:
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def tokenizer_pad_id(folder: Path) -> int:
    from transformers import AutoTokenizer

    pad = AutoTokenizer.from_pretrained(folder).pad_token_id
    return 0 if pad is None else pad


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---- MiniMind's own trainer, run from a checkout outside this repository ----


def write_minimind_sft(conversations: list[list[dict]], path: Path) -> None:
    """The rows in MiniMind's SFT format: one {"conversations": [{role, content}, ...]} a line."""
    with path.open("w", encoding="utf-8") as handle:
        for turns in conversations:
            handle.write(json.dumps({"conversations": turns}, ensure_ascii=False) + "\n")


def minimind_seconds(checkout: Path, args, data: Path, work: Path) -> float:
    """MiniMind's trainer/train_full_sft.py in its own process and environment (`--minimind-python`), from
    random weights at d512x8, batch `batch`, max length 768, fp32 on CPU, one epoch over the same rows, a
    log line per step. Returns the seconds of its steps after the first (the first pays for start-up),
    timed between its log lines as they arrive."""
    import re
    import subprocess

    command = [
        args.minimind_python,
        "train_full_sft.py",
        *("--hidden_size", "512", "--num_hidden_layers", "8", "--max_seq_len", str(MINIMIND_LEN)),
        *("--batch_size", str(args.batch), "--epochs", "1", "--log_interval", "1", "--from_weight", "none"),
        *("--num_workers", "1", "--device", "cpu", "--data_path", str(data), "--save_dir", str(work / "minimind-out")),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONUNBUFFERED"] = "1"
    started, stamps, lines = time.perf_counter(), [], []
    # It reads its tokenizer from ../model and writes checkpoints to ../checkpoints: it runs from trainer/.
    with subprocess.Popen(
        command, cwd=checkout / "trainer", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as child:
        for line in child.stdout:
            lines.append(line.rstrip())
            if re.search(r"Epoch:\[\d+/\d+\]\(\d+/\d+\), loss", line):
                stamps.append(time.perf_counter() - started)
    if child.returncode or len(stamps) < 2:
        tail = "\n".join(lines[-30:])
        raise RuntimeError(f"MiniMind's trainer failed (exit {child.returncode}, {len(stamps)} step lines):\n{tail}")
    return stamps[-1] - stamps[0]


if __name__ == "__main__":
    main()

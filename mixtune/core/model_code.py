"""mixtune never runs a model folder's own Python code. A folder whose config.json or tokenizer_config.json maps
its classes to its own modules (`auto_map`) and names a model type or tokenizer class transformers does not
ship is refused before any work. Every load also passes trust_remote_code=False, so transformers refuses such
a folder outright: left unset, it asks "Do you wish to run the custom code? [y/N]" on an interactive console
and waits 15 s for a keystroke that would run the folder's code."""

from __future__ import annotations

import json
from pathlib import Path

MAX_JSON_BYTES = 1 << 20  # a model's config.json is a few KB


def needs_own_code(folder: Path) -> str | None:
    """What in `folder` names code transformers does not ship, or None. transformers is imported only for a
    folder that has an auto_map: config checks of ordinary folders stay fast."""
    config, tokenizer = settings(folder / "config.json"), settings(folder / "tokenizer_config.json")
    reasons = []
    if "auto_map" in config and not known_model_type(config.get("model_type")):
        model_type = config.get("model_type")
        reasons.append(f"config.json: auto_map, and model_type {model_type!r} is not one transformers ships")
    if "auto_map" in tokenizer and not known_class(tokenizer.get("tokenizer_class")):
        reasons.append(
            f"tokenizer_config.json: auto_map, and tokenizer_class {tokenizer.get('tokenizer_class')!r} is not one "
            "transformers ships"
        )
    return "; ".join(reasons) or None


def settings(path: Path) -> dict:
    """The file's JSON object; {} when there is none to read (transformers reports a broken file itself)."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            return {}
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def known_model_type(model_type: object) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES


def known_class(name: object) -> bool:
    import transformers

    return isinstance(name, str) and name.isidentifier() and hasattr(transformers, name)

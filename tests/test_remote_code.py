"""A model folder never runs its own code: one that needs it is refused before any work, naming model.path,
and every load refuses it outright (trust_remote_code=False: no "[y/N]" prompt, no wait)."""

import ast
import builtins
import json
from pathlib import Path

import pytest

from mixtune.core.config import ConfigError, validate_config
from tests.conftest import tiny_raw_config

ROOT = Path(__file__).resolve().parents[1]


def model_folder(folder: Path, model_type: str) -> Path:
    """config.json maps AutoConfig and AutoModelForCausalLM to the folder's own module, which would leave a
    marker file if it were ever imported."""
    folder.mkdir()
    marker = folder / "RAN"
    (folder / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    auto_map = {"AutoConfig": "modeling_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomLM"}
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "auto_map": auto_map}))
    return folder


def test_a_model_that_needs_its_own_code_is_refused_naming_the_field(tmp_path):
    folder = model_folder(tmp_path / "model", "mixtune-custom")
    raw = tiny_raw_config(tmp_path, model={"path": str(folder)})
    with pytest.raises(ConfigError, match=r"model.path: .* needs its own Python code \(config.json: auto_map"):
        validate_config(raw, "test config", base_dir=tmp_path)
    assert not (folder / "RAN").exists()


def test_an_auto_map_beside_a_model_type_transformers_ships_is_loaded_with_transformers_code(tmp_path):
    folder = model_folder(tmp_path / "model", "llama")
    validate_config(tiny_raw_config(tmp_path, model={"path": str(folder)}), "test config", base_dir=tmp_path)


def test_every_load_refuses_a_folders_code_without_asking(tmp_path, monkeypatch):
    from tasks.models import load_model

    folder = model_folder(tmp_path / "model", "mixtune-custom")
    monkeypatch.setattr(builtins, "input", lambda *_: pytest.fail("transformers asked whether to run the code"))
    with pytest.raises(ValueError, match="custom code"):
        load_model(str(folder), str(folder))
    assert not (folder / "RAN").exists()


def test_every_transformers_auto_load_passes_trust_remote_code_false():
    loose = []
    for path in [*ROOT.glob("tasks/*.py"), *ROOT.glob("flows/*.py"), *ROOT.glob("mixtune/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            call = node if isinstance(node, ast.Call) else None
            func = call.func if call else None
            if not (isinstance(func, ast.Attribute) and func.attr == "from_pretrained"):
                continue
            if not (isinstance(func.value, ast.Name) and func.value.id.startswith("Auto")):
                continue
            trust = {k.arg: k.value for k in call.keywords}.get("trust_remote_code")
            if not (isinstance(trust, ast.Constant) and trust.value is False):
                loose.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert loose == []

"""A model folder that is not a Hugging Face folder says what it holds and what to give instead."""

import pytest

from mixtune.core.config import ConfigError, validate_config
from tests.conftest import tiny_raw_config


def test_a_gguf_folder_gets_a_hint(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "smol-135m-q8_0.gguf").write_bytes(b"GGUF")
    raw = tiny_raw_config(tmp_path, model={"path": str(folder)})
    with pytest.raises(ConfigError, match="model.path: no Hugging Face model") as err:
        validate_config(raw, "test config", base_dir=tmp_path)
    assert ".gguf file" in str(err.value) and "config.json, *.safetensors" in str(err.value)

"""Bounded inputs: configs whose parsing could run away, rows too large to tokenise, sources that change
while they are read, and validation sets too small to measure anything."""

import subprocess
import sys

import pytest
import yaml

from mixtune.core.config import MAX_CONFIG_BYTES, ConfigError, load_config

BOMB = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
)
LOAD_AND_REPORT_RSS = """
import resource, sys, time
from mixtune.core.config import ConfigError, load_config
start = time.perf_counter()
try:
    load_config(sys.argv[1], sys.argv[2:])
except ConfigError as err:
    print(err, file=sys.stderr)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def load_in_subprocess(path, overrides=()) -> tuple[float, int, str]:
    done = subprocess.run(
        [sys.executable, "-c", LOAD_AND_REPORT_RSS, str(path), *overrides], capture_output=True, text=True, timeout=120
    )
    seconds, rss_mb = done.stdout.split()
    return float(seconds), int(rss_mb), done.stderr


def test_a_yaml_alias_bomb_as_a_whole_file_is_refused_fast_in_bounded_memory(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB + "\n")  # 9^9 = 387 million strings when expanded
    seconds, rss_mb, message = load_in_subprocess(bomb)
    assert str(bomb) in message and "aliases expand to more than" in message
    # Measured about 0.01 s; the bound is loose because the machine is shared.
    assert seconds < 5
    assert rss_mb < 500  # the interpreter and pydantic; safe_load grew past 2 GB on this file


def test_a_yaml_alias_bomb_in_one_field_is_refused(tmp_path):
    config = tmp_path / "bomb.yaml"
    config.write_text(
        "run:\n  name: x\n  output_dir: " + str(tmp_path) + "\nrecipe:\n" + "  " + BOMB.replace("\n", "\n  ") + "\n"
    )
    with pytest.raises(ConfigError, match="aliases expand"):
        load_config(config)
    plain = tmp_path / "plain.yaml"
    plain.write_text("run:\n  name: x\n")
    value = "{" + BOMB.replace("\n", ", ") + "}"
    seconds, rss_mb, message = load_in_subprocess(plain, [f"run.name={value}"])
    assert "--set run.name" in message and "aliases expand" in message
    assert seconds < 5 and rss_mb < 500


def test_an_oversized_or_self_referring_config_is_refused_naming_the_file(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("run:\n  name: x\n" + "#" * MAX_CONFIG_BYTES + "\n")
    with pytest.raises(ConfigError, match="over the 1,048,576-byte limit") as err:
        load_config(big)
    assert str(big) in str(err.value)
    loop = tmp_path / "loop.yaml"
    loop.write_text("run: &r\n  name: x\n  again: *r\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        load_config(loop)
    deep = tmp_path / "deep.yaml"
    deep.write_text("run: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(deep)


def test_ordinary_yaml_and_anchors_load_as_safe_load_does():
    from mixtune.core.config import bounded_yaml

    text = "base: &b {lr: 0.001, steps: [1, 2]}\nstage: *b\nother: {<<: *b, lr: 0.01}\n"
    assert bounded_yaml(text, "t") == yaml.safe_load(text)
    with open("pipeline.yaml") as handle:
        default = handle.read()
    assert bounded_yaml(default, "pipeline.yaml") == yaml.safe_load(default)

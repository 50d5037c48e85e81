import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mixtune.core.config import ConfigError, load_config, validate_config
from tests.conftest import tiny_raw_config

ROOT = Path(__file__).resolve().parents[1]


def write_config(folder: Path, mutate) -> Path:
    raw = yaml.safe_load((ROOT / "pipeline.yaml").read_text())
    raw["run"]["output_dir"] = str(folder / "runs")
    mutate(raw)
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_default_pipeline_yaml_is_valid():
    config = load_config(ROOT / "pipeline.yaml")
    assert {s.role for s in config.data.sources} == {"general", "domain"}
    assert Path(config.run.output_dir).is_absolute()


# `mixtune run` on a bad config, reporting which heavy libraries it had imported when it refused: the refusal is
# fast because none is (wall time on a shared machine would measure the machine, not this).
REFUSE_AND_LIST_IMPORTS = """
import sys
from mixtune.cli import main
code = main(["run", sys.argv[1]])
print(code, sorted({"torch", "transformers", "prefect", "mlflow", "peft"} & sys.modules.keys()))
"""


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda raw: raw["train"].update(learnig_rate=1e-3), "train.learnig_rate: unknown key"),
        (lambda raw: raw["train"].update(learning_rate=-1e-4), "train.learning_rate"),
        (lambda raw: raw["train"].update(learning_rate=float("inf")), "train.learning_rate: Input should be a finite"),
        (lambda raw: raw["train"].update(learning_rate=float("nan")), "train.learning_rate: Input should be a finite"),
        (lambda raw: raw.update(pretrain={"learning_rate": 1e9}), "pretrain.learning_rate: Input should be less"),
        (lambda raw: raw["validation"].update(forgetting_budget=float("inf")), "validation.forgetting_budget"),
        (lambda raw: raw["train"].update(weight_decay=float("nan")), "train.weight_decay"),
        (lambda raw: raw.update(trian={}), "trian: unknown key"),
        (
            lambda raw: raw["data"]["sources"].append({"path": "nowhere.jsonl", "role": "domain"}),
            "data.sources.2.path: file not found",
        ),
        (lambda raw: raw["schedule"].update(shares=[0.1, 1.5]), "schedule"),
        (lambda raw: raw["data"].update(sources=[{"synthetic": "general", "role": "general"}]), "role domain"),
        (lambda raw: raw.update(deploy={"cron": "61 * * * *"}), "deploy.cron: Value error, Invalid cron string"),
        (
            lambda raw: raw.update(deploy={"timezone": "Mars/Olympus"}),
            "deploy.timezone: Value error, unknown time zone 'Mars/Olympus'",
        ),
        (lambda raw: raw.update(registry={"alias": "not an alias"}), "registry.alias"),
        (lambda raw: raw.update(pretrain={"enabled": False}), "pretrain.enabled: false needs model.path"),
        (lambda raw: raw.update(pretrain={"enabled": "sometimes"}), "pretrain.enabled"),
    ],
)
def test_bad_config_names_the_field(tmp_path, mutate, expected):
    path = write_config(tmp_path, mutate)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_infinite_learning_rate_given_with_set_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"train.learning_rate: Input should be a finite number \(got inf\)"):
        load_config(write_config(tmp_path, lambda raw: None), ["train.learning_rate=.inf"])


def test_a_source_that_is_a_symlink_loop_is_refused_naming_the_field_and_the_path(tmp_path):
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(tmp_path / "other.jsonl")
    (tmp_path / "other.jsonl").symlink_to(loop)
    path = write_config(tmp_path, lambda raw: raw["data"]["sources"].append({"path": str(loop), "role": "domain"}))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"data.sources.2.path: cannot resolve {loop}: Symlink loop" in str(err.value)
    assert str(path) in str(err.value)


def test_set_overrides_one_field_with_its_type(tmp_path):
    path = write_config(tmp_path, lambda raw: None)
    config = load_config(path, ["train.learning_rate=1e-4", "schedule.shares=[0.2, 0.4]"])
    assert config.train.learning_rate == 1e-4
    assert config.schedule.shares == [0.2, 0.4]
    with pytest.raises(ConfigError, match="train.lr: unknown key"):
        load_config(path, ["train.lr=1"])


@pytest.mark.integration
@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda raw: raw["train"].update(learnig_rate=1e-3), "train.learnig_rate"),
        (lambda raw: raw["train"].update(learning_rate=-1), "train.learning_rate"),
        (lambda raw: raw["data"]["sources"].append({"path": "gone.jsonl", "role": "domain"}), "gone.jsonl"),
    ],
)
def test_cli_rejects_bad_config_fast_and_trains_nothing(tmp_path, mutate, expected):
    path = write_config(tmp_path, mutate)
    done = subprocess.run(
        [sys.executable, "-c", REFUSE_AND_LIST_IMPORTS, str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,  # a bound on a hung process, not on speed
    )
    assert done.stdout.split() == ["2", "[]"], done.stdout + done.stderr[-2000:]
    assert expected in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.integration
def test_cli_help_lists_every_command():
    done = subprocess.run([sys.executable, "-m", "mixtune.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    for command in ("run", "check", "advise", "serve", "deploy", "compare"):
        assert command in done.stdout


@pytest.mark.integration
def test_serve_without_a_prefect_server_says_how_to_start_one(tmp_path):
    path = write_config(tmp_path, lambda raw: None)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run(
        [sys.executable, "-m", "mixtune.cli", "serve", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,  # a bound on a hung process, not on speed
        env=env,
    )
    assert done.returncode == 2 and "prefect server start" in done.stderr and "PREFECT_API_URL" in done.stderr


@pytest.mark.integration
def test_compare_on_an_empty_experiment_says_so(tmp_path):
    path = write_config(tmp_path, lambda raw: None)
    done = subprocess.run(
        [sys.executable, "-m", "mixtune.cli", "compare", str(path), "--experiment", "nothing"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,  # a bound on a hung process, not on speed: loaded CI machines take 100 s here
    )
    assert done.returncode == 1 and "no mixtune runs in experiment 'nothing'" in done.stderr, done.stderr


def schema_fields(model, prefix=""):
    from typing import get_args, get_origin

    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        nested = [
            a
            for a in (
                field.annotation,
                *get_args(field.annotation),
                *[b for a in get_args(field.annotation) for b in get_args(a)],
            )
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if nested:
            marker = "[]" if get_origin(field.annotation) is list else ""
            yield from schema_fields(nested[0], f"{prefix}{name}{marker}.")
        else:
            yield f"{prefix}{name}", field


def test_every_field_is_documented_in_the_config_reference_and_schema():
    from mixtune.core.config import PipelineConfig

    readme = (ROOT / "docs" / "config.md").read_text()
    for path, field in schema_fields(PipelineConfig):
        assert f"`{path}`" in readme or f"`{path.rsplit('.', 1)[0]}." in readme and path.split(".")[-1] in readme, path
        assert field.description, f"{path} has no description (the Prefect UI form shows it)"


def test_the_prefect_form_opens_on_data_schedule_train_validation_with_a_title_on_every_field(tmp_path):
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    from flows.finetune import finetune
    from tests.conftest import tiny_config

    schema = parameter_schema(finetune.fn).model_dump_for_openapi()
    definitions = schema["definitions"]
    assert list(definitions["PipelineConfig"]["properties"])[:4] == ["data", "schedule", "train", "validation"]
    for model in definitions.values():
        for name, prop in model.get("properties", {}).items():
            assert prop.get("title"), name
    # null stays a valid value where the config allows it, as the server validates run parameters (its schema
    # preprocessing gives fields without a default their null back)
    raw = tiny_config(tmp_path, model={"path": None, "preset": "tiny"}).model_dump(mode="json")
    validate({"config": raw}, {**schema, "definitions": definitions}, raise_on_error=True)


@pytest.mark.parametrize(("written", "read"), [(None, "auto"), ("auto", "auto"), (True, True)])
def test_pretraining_is_auto_true_or_false_and_null_still_reads_as_auto(tmp_path, written, read):
    config = load_config(write_config(tmp_path, lambda raw: raw.update(pretrain={"enabled": written})))
    assert config.pretrain.enabled == read


@pytest.mark.parametrize("name", [".", "..", "...", "a/b", "a\\b"])
def test_a_run_name_that_would_leave_its_folder_is_refused_naming_the_field(tmp_path, name):
    with pytest.raises(ConfigError, match=r"  run.name: String should match pattern"):
        validate_config(tiny_raw_config(tmp_path, run={"name": name}), "test config", base_dir=tmp_path)
    validate_config(tiny_raw_config(tmp_path, run={"name": ".hidden-v1.2"}), "test config", base_dir=tmp_path)

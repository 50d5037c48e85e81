"""The Prefect run form, checked on what the server stores: the manual deployment's parameter schema and its
default values, validated the way the server validates a run (hydration, then its schema preprocessing)."""

import copy
import json

import pytest
from prefect._internal.schemas.validators import validate_values_conform_to_schema
from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate
from prefect.utilities.schema_tools.validation import ValidationError, validate

from flows.deployments import deployment_specs, run_form
from flows.finetune import finetune
from mixtune.core.config import FORM_FIRST, FORM_MORE, SERVED_FIXED, PipelineConfig
from mixtune.core.policy import ServedPolicy, enforce
from tests.conftest import tiny_config


def manual_deployment(tmp_path, **sections):
    config = tiny_config(tmp_path, deploy={"name": "form", "cron": "0 3 * * *"}, **sections)
    [manual, scheduled] = [run_form(finetune.to_deployment(**spec)) for spec in deployment_specs(config)]
    schema = manual._parameter_openapi_schema.model_dump_for_openapi()
    return config, schema, manual.parameters, scheduled.parameters


def properties(schema: dict):
    """(where, name, property) of every property of the schema and of each sub-model it refers to."""
    for where, node in [("parameters", schema), *schema["definitions"].items()]:
        for name, prop in node.get("properties", {}).items():
            yield where, name, prop


def server_accepts(schema: dict, parameters: dict) -> None:
    validate(hydrate(parameters, HydrationContext(raise_on_error=True)), schema, raise_on_error=True)


def test_every_field_has_a_title_and_only_optional_sub_models_offer_a_none_alternative(tmp_path):
    _, schema, _, _ = manual_deployment(tmp_path)
    untitled = [f"{where}.{name}" for where, name, prop in properties(schema) if not prop.get("title")]
    assert untitled == []
    nullable = {
        f"{where}.{name}" for where, name, prop in properties(schema) if {"type": "null"} in prop.get("anyOf", [])
    }
    # An optional sub-model may be absent: the form shows it on another tab.
    assert nullable == {"Source.columns", "Source.eval"}
    assert "Field (Optional)" not in json.dumps(schema)
    model = schema["definitions"]["Model"]["properties"]
    assert model["path"]["type"] == "string" and "default" not in model["path"]
    assert schema["definitions"]["Source"]["properties"]["synthetic"]["enum"] == ["general", "domain", None]
    # A choice, not a nullable bool: the form drew that as an off switch, and an untouched form sent false.
    assert schema["definitions"]["Pretrain"]["properties"]["enabled"]["enum"] == ["auto", True, False]


def test_the_form_opens_on_per_run_sections_and_titles_the_rest_more(tmp_path):
    _, schema, manual, scheduled = manual_deployment(tmp_path)
    sections = schema["definitions"]["PipelineConfig"]["properties"]
    assert list(sections)[: len(FORM_FIRST)] == list(FORM_FIRST)
    assert all(sections[name]["title"].startswith("More: ") for name in FORM_MORE if name not in SERVED_FIXED)
    form = manual["config"]
    # The sections the deployment fixes are neither in the form nor in its values.
    assert not set(SERVED_FIXED) & (set(sections) | set(form))
    # Unset fields are left out, so the form shows no null values; the flow restores their defaults.
    assert "path" not in form["data"]["sources"][0] and "columns" not in form["data"]["sources"][0]
    assert "learning_rate" not in form["train"]
    assert scheduled == manual


def test_the_server_registers_the_deployment_with_these_values(tmp_path):
    """What the server checks when `mixtune serve` registers it: its own parameters, unhydrated."""
    _, schema, manual, _ = manual_deployment(tmp_path)
    validate_values_conform_to_schema(manual, schema, ignore_required=True)


def test_the_server_accepts_the_form_as_it_opens_and_the_flow_reads_the_same_config(tmp_path):
    config, schema, manual, _ = manual_deployment(tmp_path, train={"learning_rate": 0.002})
    server_accepts(schema, manual)
    hydrated = hydrate(manual, HydrationContext(raise_on_error=True))["config"]
    policy = ServedPolicy.for_served(config, tmp_path)  # puts back what the deployment fixes
    assert enforce(PipelineConfig.model_validate(hydrated), policy) == config


@pytest.mark.parametrize(("field", "value"), [("output_dir", "/tmp/elsewhere"), ("name", ".."), ("name", "a/b")])
def test_the_server_refuses_a_run_folder_a_run_may_not_choose(tmp_path, field, value):
    _, schema, manual, _ = manual_deployment(tmp_path)
    assert "output_dir" not in manual["config"]["run"]
    sneaky = hydrate(manual, HydrationContext(raise_on_error=True))
    sneaky["config"]["run"][field] = value
    with pytest.raises(ValidationError, match=field if field == "output_dir" else "does not match"):
        server_accepts(schema, sneaky)


@pytest.mark.parametrize("section", SERVED_FIXED)
def test_the_server_refuses_a_run_that_sends_a_section_the_deployment_fixes(tmp_path, section):
    config, schema, manual, _ = manual_deployment(tmp_path)
    sneaky = hydrate(manual, HydrationContext(raise_on_error=True))
    sneaky["config"][section] = config.public_dump()[section]
    with pytest.raises(ValidationError, match=section):
        server_accepts(schema, sneaky)


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("train", "learning_rate", None),
        ("model", "path", None),
        ("schedule", "shares", None),
    ],
)
def test_an_explicit_null_still_passes_the_server(tmp_path, section, field, value):
    config, schema, _, _ = manual_deployment(tmp_path)
    plain = {name: value for name, value in config.public_dump().items() if name not in SERVED_FIXED}
    del plain["run"]["output_dir"]
    plain[section][field] = value
    plain["data"]["sources"][0]["columns"] = None
    server_accepts(schema, {"config": plain})


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("train", "learning_rate", -1),
        ("model", "preset", "huge"),
        ("registry", "model_name", "has spaces"),
        ("schedule", "shares", [1.5]),
    ],
)
def test_the_server_still_refuses_a_bad_value_naming_the_field(tmp_path, section, field, value):
    config, schema, manual, _ = manual_deployment(tmp_path)
    bad = copy.deepcopy(manual)
    hydrated = hydrate(bad, HydrationContext(raise_on_error=True))
    hydrated["config"][section][field] = value
    with pytest.raises(ValidationError, match=field):
        server_accepts(schema, hydrated)


@pytest.mark.parametrize("section", ["train", "pretrain"])
def test_the_server_refuses_an_infinite_learning_rate_it_would_otherwise_store_as_unset(tmp_path, section):
    """The server stores a run's `Infinity` as null (read as "unset"): only the schema's maximum stops it first."""
    _, schema, manual, _ = manual_deployment(tmp_path)
    hydrated = hydrate(manual, HydrationContext(raise_on_error=True))
    assert "learning_rate" not in hydrated["config"][section]
    server_accepts(schema, hydrated)
    for accepted in (1e-3, 1.0):
        hydrated["config"][section]["learning_rate"] = accepted
        server_accepts(schema, hydrated)
    for refused in (float("inf"), 1e9):
        hydrated["config"][section]["learning_rate"] = refused
        with pytest.raises(ValidationError, match="learning_rate"):
            server_accepts(schema, hydrated)

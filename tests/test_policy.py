"""What a served run may do: credentials go only to allowed tracking servers, inputs stay inside the data
roots (symlinks and .. resolved), and URIs are shown with their password redacted."""

import pytest

from mixtune.core.config import ConfigError, PipelineConfig
from mixtune.core.policy import ServedPolicy, enforce, served_policy
from mixtune.core.uris import redact_uri, split_credentials
from tests.conftest import tiny_config, tiny_raw_config


def test_redaction_and_splitting():
    assert redact_uri("https://bob:s3cret@mlflow.example:5000/x") == "https://bob:***@mlflow.example:5000/x"
    assert redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert split_credentials("http://bob:pw@host:5/p") == ("http://host:5/p", "bob", "pw")
    assert split_credentials("sqlite:////tmp/mlflow.db") == ("sqlite:////tmp/mlflow.db", None, None)


def test_the_logged_config_carries_no_password(tmp_path):
    config = tiny_config(tmp_path, tracking={"tracking_uri": "http://bob:s3cret@host:5000"})
    assert "s3cret" not in str(config.public_dump()) and "bob:***@host" in str(config.public_dump())


def served(tmp_path, **sections) -> tuple:
    data = tmp_path / "data"
    data.mkdir()
    (data / "own.jsonl").write_text("{}\n")
    config = tiny_config(tmp_path / "served", tracking={"tracking_uri": "http://127.0.0.1:5000"}, **sections)
    return ServedPolicy.for_served(config, data), data


def run_config(tmp_path, **sections):
    """A run's parameters as the flow gets them: without run.output_dir unless the run sends one (the form
    leaves it out), paths not yet resolved."""
    raw = tiny_raw_config(tmp_path / "run", **sections)
    if "output_dir" not in sections.get("run", {}):
        del raw["run"]["output_dir"]
    return PipelineConfig.model_validate(raw)


def test_a_served_run_gets_the_fixed_sections_and_may_not_set_them(tmp_path):
    policy, _ = served(
        tmp_path, advisor={"lora_below": 7}, deploy={"allowed_tracking_uris": ["https://other.example/"]}
    )
    config = enforce(run_config(tmp_path), policy)
    assert config.tracking.tracking_uri == "http://127.0.0.1:5000" and config.advisor.lora_below == 7
    assert config.deploy.allowed_tracking_uris == ["https://other.example/"]
    enforce(run_config(tmp_path, tracking={"tracking_uri": "http://127.0.0.1:5000"}), policy)  # the same: no change
    changes = [
        ("tracking", {"tracking_uri": "https://other.example"}),  # even an allowed one: the deployment says where
        ("deploy", {"data_roots": ["/"]}),
        ("advisor", {"lora_below": 8}),
    ]
    for section, value in changes:
        with pytest.raises(ConfigError, match=rf"  {section}: fixed by the deployment"):
            enforce(run_config(tmp_path, **{section: value}), policy)


def test_a_served_run_writes_under_the_served_output_dir_and_may_not_name_another(tmp_path):
    policy, _ = served(tmp_path)
    confined = enforce(run_config(tmp_path, run={"name": "own"}), policy)
    assert confined.run.output_dir == str(tmp_path / "served") and confined.run.name == "own"
    enforce(run_config(tmp_path, run={"output_dir": str(tmp_path / "served")}), policy)  # the same: no change
    with pytest.raises(ConfigError, match=r"  run.output_dir: fixed by the deployment"):
        enforce(run_config(tmp_path, run={"output_dir": str(tmp_path / "elsewhere")}), policy)


def test_a_run_may_name_only_allowed_tracking_servers(tmp_path):
    """A policy that fixes no section (as from an older `mixtune serve`) still confines the tracking server."""
    policy, _ = served(tmp_path, deploy={"allowed_tracking_uris": ["https://other.example/"]})
    policy.fixed = {}
    enforce(run_config(tmp_path), policy)  # unset: the worker's own
    enforce(run_config(tmp_path, tracking={"tracking_uri": "http://127.0.0.1:5000/"}), policy)
    enforce(run_config(tmp_path, tracking={"tracking_uri": "https://other.example"}), policy)
    with pytest.raises(ConfigError, match=r"tracking.tracking_uri: http://127.0.0.1:9999 is not"):
        enforce(run_config(tmp_path, tracking={"tracking_uri": "http://127.0.0.1:9999"}), policy)
    with pytest.raises(ConfigError, match="tracking.tracking_uri: credentials in a run's parameters"):
        enforce(run_config(tmp_path, tracking={"tracking_uri": "http://u:p@127.0.0.1:5000"}), policy)


def test_a_run_reads_only_inside_its_data_roots(tmp_path):
    policy, data = served(tmp_path)
    outside = tmp_path / "secret" / "creds.jsonl"
    outside.parent.mkdir()
    outside.write_text("{}\n")
    (data / "link.jsonl").symlink_to(outside)
    inside = {"path": str(data / "own.jsonl"), "role": "domain"}
    enforce(run_config(tmp_path, data={"sources": [{**inside, "role": "general"}, inside]}), policy)
    for sneaky in (str(data / ".." / "secret" / "creds.jsonl"), str(data / "link.jsonl"), str(outside)):
        config = run_config(tmp_path, data={"sources": [{**inside, "role": "general"}, {**inside, "path": sneaky}]})
        with pytest.raises(ConfigError, match=r"data.sources.1.path: .* is outside the folders"):
            enforce(config, policy)


def test_a_served_run_naming_a_symlink_loop_is_refused_naming_the_field_and_the_path(tmp_path):
    policy, data = served(tmp_path)
    loop = data / "loop.jsonl"
    loop.symlink_to(loop)
    inside = {"path": str(data / "own.jsonl"), "role": "general"}
    config = run_config(tmp_path, data={"sources": [inside, {**inside, "role": "domain"}]})
    config.data.sources[1].path = str(loop)  # as a flow run's parameters arrive: not yet resolved
    with pytest.raises(ConfigError, match=rf"data.sources.1.path: cannot resolve {loop}: Symlink loop"):
        enforce(config, policy)


def test_the_served_configs_own_inputs_are_allowed_outside_the_roots(tmp_path):
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text("{}\n")
    own = {
        "data": {"sources": [{"path": str(elsewhere), "role": "general"}, {"synthetic": "domain", "role": "domain"}]}
    }
    policy, _ = served(tmp_path, **own)
    enforce(run_config(tmp_path, **own), policy)


def test_a_deployment_run_without_a_policy_gets_the_strictest(tmp_path, monkeypatch):
    monkeypatch.delenv("MIXTUNE_SERVED_POLICY", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert served_policy(is_deployment_run=False) is None
    monkeypatch.chdir(tmp_path)
    policy = served_policy(is_deployment_run=True)
    with pytest.raises(ConfigError, match="tracking.tracking_uri"):
        enforce(run_config(tmp_path, tracking={"tracking_uri": "http://127.0.0.1:5000"}), policy)
    assert enforce(run_config(tmp_path), policy).run.output_dir == str(tmp_path.resolve() / "runs")
    with pytest.raises(ConfigError, match="run.output_dir: fixed"):
        enforce(run_config(tmp_path, run={"output_dir": "/tmp"}), policy)

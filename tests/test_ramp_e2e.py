"""The adaptive ramp and the task metrics in the real flow, on a tiny config."""

import pytest
from mlflow.tracking import MlflowClient

from flows.finetune import finetune
from tasks.mlflow_names import Tag
from tasks.schedule import next_share
from tests.conftest import tiny_config
from tests.test_e2e import stage_runs

pytestmark = pytest.mark.e2e
BUDGET = 0.1


@pytest.mark.usefixtures("shared_cache", "mlflow_db")
def test_the_adaptive_ramp_chooses_each_share_from_the_stage_before_and_ends_within_the_budget(
    prefect_harness, tmp_path
):
    config = tiny_config(
        tmp_path,
        schedule={"shape": "adaptive", "start": 0.1, "end": 0.5, "stages": 3, "samples_per_stage": 160},
        validation={"forgetting_budget": BUDGET, "on_forgetting": "stop"},
    )
    summary = finetune(config)
    stages = summary.stages
    assert [r.gate.decision for r in stages] == ["continue"] * 3  # exactly schedule.stages, none past the budget
    assert stages[-1].gate.general_drift <= BUDGET and stages[-1].next_share is None
    assert stages[0].target_share == 0.1
    runs = stage_runs(MlflowClient(summary.tracking_uri), summary.parent_run_id)
    drift, gain = 0.0, 0.0
    for before, after in zip(stages, stages[1:]):
        choice = before.next_share
        measured_gain = (summary.baseline.domain - before.losses.domain) / summary.baseline.domain
        again = next_share(
            before.target_share, before.gate.general_drift, measured_gain, BUDGET, config.schedule, drift, gain
        )
        assert choice == again  # deterministic, from the numbers the stage measured
        assert after.target_share == choice.share and abs(after.realised_share - choice.share) <= 0.01
        logged = runs[before.stage].data
        assert logged.metrics["ramp/next_domain_share"] == pytest.approx(choice.share)
        assert logged.metrics["ramp/budget_left"] == pytest.approx(BUDGET - choice.drift)
        assert logged.tags[Tag.NEXT_SHARE_REASON] == choice.reason
        assert float(runs[after.stage].data.params["target_domain_share"]) == pytest.approx(choice.share)
        drift, gain = choice.drift, choice.gain


@pytest.mark.usefixtures("shared_cache", "mlflow_db")
def test_a_domain_eval_is_logged_for_the_base_and_after_every_stage(prefect_harness, tmp_path):
    sources = [
        {"synthetic": "general", "samples": 800, "role": "general"},
        {
            "synthetic": "domain",
            "samples": 400,
            "role": "domain",
            "val_fraction": 0.15,
            "eval": {"metric": "exact_match", "max_samples": 8, "max_new_tokens": 24},
        },
    ]
    config = tiny_config(
        tmp_path,
        data={"sources": sources},
        schedule={"stages": 2, "samples_per_stage": 80},
        validation={"forgetting_budget": 10.0},
    )
    summary = finetune(config)
    name = "task/synthetic_domain/exact_match"
    assert 0.0 <= summary.baseline_tasks[name] <= 1.0
    tasks = [sorted(n for n in r.task_metrics if n.startswith("task/")) for r in summary.stages]
    assert tasks == [[name], [name]]
    said = {"gen/length_ratio", "gen/stopped_early", "gen/looped", "gen/format_kept"}  # the generation check
    assert all(said <= set(r.task_metrics) for r in summary.stages)
    client = MlflowClient(summary.tracking_uri)
    history = {m.step: m.value for m in client.get_metric_history(summary.parent_run_id, name)}
    assert history == {0: summary.baseline_tasks[name], **{r.stage: r.task_metrics[name] for r in summary.stages}}
    for stage, run in stage_runs(client, summary.parent_run_id).items():
        assert run.data.metrics[name] == summary.stages[stage - 1].task_metrics[name]
    final = summary.stages[summary.final_stage - 1].task_metrics[name]
    assert client.get_run(summary.parent_run_id).data.metrics[f"final_{name}"] == final

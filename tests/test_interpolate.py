"""validation.interpolate: base + alpha * (fine-tuned - base) on tiny real models: the ends of the grid are the two
models exactly, the chosen alpha holds the budget on the rows that did not choose it, a LoRA stage interpolates
as its merged model, and the choice rule falls back when confirmation fails."""

from pathlib import Path

import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from tasks.checkpoints import problem_with
from tasks.interpolate import choose, full_weights, interpolate, save_interpolated, scored, set_weights
from tasks.interpolate import float_params as weights
from tasks.lm import PadCollator, mean_token_loss
from tasks.mlflow_names import TASK, Metric, Tag, interpolation_metric
from tasks.models import evaluate
from tasks.records import AlphaPoint, TokenLosses
from tasks.tables import IGNORE, validation_halves
from tests.conftest import finished_stage_report, tiny_config, tiny_hf_model
from tests.records import run_request

PATTERN = [5, 6, 7, 8, 9, 10]  # the "domain": one repeated phrase, easy to learn, unlike the random general rows


def sft_rows(path: Path, vocab: int) -> str:
    """Validation rows of a domain and a general set, prompt tokens unlabelled, as the flow's table holds them."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for tag in ("domain", "general"):
        for i in range(12):
            ids = (PATTERN * 3)[:16] if tag == "domain" else torch.randint(20, vocab, (16,), generator=gen).tolist()
            labels = [IGNORE] * 4 + ids[4:]
            rows.append({"sample_id": f"{tag}-{i:02d}", "tag": tag, "split": "val", "input_ids": ids, "labels": labels})
    pd.DataFrame(rows).to_parquet(path / "sft.parquet")
    return str(path / "sft.parquet")


@pytest.fixture
def tiny_pair(tmp_path):
    """(base folder, fine-tuned folder, sft table): the fine-tuned model trained a few steps on the domain rows."""
    base = tiny_hf_model(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    sft = sft_rows(tmp_path, model.config.vocab_size)
    torch.manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-2)
    ids = torch.tensor([(PATTERN * 3)[:16]] * 4)
    for _ in range(15):
        optimiser.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimiser.step()
    tuned = tmp_path / "tuned"
    model.save_pretrained(tuned)
    AutoTokenizer.from_pretrained(base).save_pretrained(tuned)
    return str(base), str(tuned), sft


def interpolated_folder(base: str, tuned: str, alpha: float, folder: Path) -> str:
    model = full_weights(tuned, base)
    set_weights(model, weights(AutoModelForCausalLM.from_pretrained(base)), weights(model), alpha)
    save_interpolated(model, base, folder, {"alpha": alpha})
    return str(folder)


def test_alpha_0_is_the_base_and_alpha_1_the_fine_tuned_model_exactly(tiny_pair, tmp_path):
    base, tuned, sft = tiny_pair
    for alpha, twin in ((0.0, base), (1.0, tuned)):
        folder = interpolated_folder(base, tuned, alpha, tmp_path / f"alpha-{alpha:g}")
        assert problem_with(folder) is None  # sealed and verified, like a stage's final
        made, expected = AutoModelForCausalLM.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(twin)
        for (name, a), (_, b) in zip(made.state_dict().items(), expected.state_dict().items()):
            assert torch.equal(a, b), name
        assert evaluate(folder, base, sft, 4) == evaluate(twin, base, sft, 4)
    halfway = evaluate(interpolated_folder(base, tuned, 0.5, tmp_path / "half"), base, sft, 4)
    assert halfway not in (evaluate(base, base, sft, 4), evaluate(tuned, base, sft, 4))


def test_the_chosen_alpha_holds_the_budget_on_the_rows_that_did_not_choose_it(tiny_pair, tmp_path):
    base, tuned, sft = tiny_pair
    before, after = evaluate(base, base, sft, 4), evaluate(tuned, base, sft, 4)
    drift = after.general / before.general - 1
    assert after.domain < before.domain and drift > 0.02  # the fine-tuned model gained and forgot
    budget = drift / 3
    config = tiny_config(tmp_path, validation={"interpolate": "auto", "forgetting_budget": budget})
    stage = finished_stage_report(tmp_path, after, {}).model_copy(update={"model_dir": tuned})
    result = interpolate(run_request(config, base, sft, before, tmp_path / "run"), [stage])
    assert 0 < result.alpha < 1 and result.stage == 1
    assert [p.alpha for p in result.points] == [0, 0.25, 0.5, 0.75, 1]
    # measured again, independently: the delivered weights against the base on the confirming half
    halves = validation_halves(sft, ("domain", "general"))
    collator = PadCollator(AutoTokenizer.from_pretrained(base).pad_token_id)
    delivered, original = (AutoModelForCausalLM.from_pretrained(m) for m in (result.model_dir, base))
    held_back = halves[("general", 1)]
    confirm_drift = mean_token_loss(delivered, held_back, collator, 4) / mean_token_loss(
        original, held_back, collator, 4
    )
    assert confirm_drift - 1 <= budget
    assert result.losses == evaluate(result.model_dir, base, sft, config.validation.batch_size)
    assert (tmp_path / "run" / "interpolation.json").is_file()
    # every point with more domain gain broke the budget on one half or the other
    chosen = next(p for p in result.points if p.alpha == result.alpha)
    better = [p for p in result.points if p.choose_gain > chosen.choose_gain]
    assert better and all(max(p.choose_drift, p.confirm_drift) > budget for p in better)


def test_a_merged_lora_stage_interpolates_as_its_merged_model(tmp_path):
    base = str(tiny_hf_model(tmp_path / "base"))
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(tmp_path / "adapter")
    merged = full_weights(str(tmp_path / "adapter"), base)
    merged.save_pretrained(tmp_path / "merged")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "merged")
    from_adapter = interpolated_folder(base, str(tmp_path / "adapter"), 0.5, tmp_path / "a")
    from_merged = interpolated_folder(base, str(tmp_path / "merged"), 0.5, tmp_path / "m")
    a, m = (AutoModelForCausalLM.from_pretrained(f).state_dict() for f in (from_adapter, from_merged))
    assert a.keys() == m.keys() and all(torch.equal(a[k], m[k]) for k in a)
    original = AutoModelForCausalLM.from_pretrained(base).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[q], original[q])  # the adapter's update, halved, is in the weights
    assert torch.allclose(a[q], original[q] + 0.5 * (merged.state_dict()[q] - original[q]), atol=1e-6)


@pytest.mark.usefixtures("mlflow_db")
def test_the_interpolation_is_what_the_run_delivers_and_its_points_are_in_mlflow(tiny_pair, tmp_path):
    from mlflow.tracking import MlflowClient

    from tasks.interpolate import record_interpolation
    from tasks.report import publish_final
    from tasks.tracking import start_parent_run

    base, tuned, sft = tiny_pair
    before, after = evaluate(base, base, sft, 32), evaluate(tuned, base, sft, 32)
    budget = (after.general / before.general - 1) / 3
    config = tiny_config(tmp_path, validation={"interpolate": "auto", "forgetting_budget": budget})
    stage = finished_stage_report(tmp_path, after, {"task/x/choice": 1.0}).model_copy(update={"model_dir": tuned})
    tracker = start_parent_run(config, "flow-a", run_folder=str(tmp_path / "run"))
    request = run_request(config, base, sft, before, tracker.run_folder, tracker)
    result = interpolate(request, [stage])
    stage = stage.model_copy(update={"run_id": tracker.parent_run_id})  # where publish reads its curves
    record_interpolation(result, budget, tracker, tmp_path / "plots")
    summary = publish_final(request, [stage], {}, result)

    assert (summary.final_model, summary.final_losses, summary.interpolation) == (
        result.model_dir,
        result.losses,
        result,
    )
    client = MlflowClient(tracker.uri)
    parent = client.get_run(tracker.parent_run_id)
    assert parent.data.tags[Tag.INTERPOLATION_ALPHA] == f"{result.alpha:g}"
    assert parent.data.metrics[Metric.FINAL_DOMAIN_VAL_LOSS] == result.losses.domain
    assert "final_task/x/choice" not in parent.data.metrics  # measured on the stage's weights, not these
    drifts = client.get_metric_history(tracker.parent_run_id, interpolation_metric("confirm", "general_drift"))
    assert [m.value for m in sorted(drifts, key=lambda m: m.step)] == pytest.approx(
        [p.confirm_drift for p in result.points]
    )
    assert (tmp_path / "plots" / "interpolation.png").is_file()
    assert "plots/interpolation.png" in [a.path for a in client.list_artifacts(tracker.parent_run_id, "plots")]
    assert interpolate(request, [stage]) == result  # reused on resume, not measured again


def test_interpolate_auto_is_new_input_and_off_hashes_as_runs_from_before_it(tmp_path):
    from tasks.inputs import input_hash, training_recipe

    off, auto = tiny_config(tmp_path), tiny_config(tmp_path, validation={"interpolate": "auto"})
    assert "interpolate" not in training_recipe(off)["validation"]
    assert training_recipe(auto)["validation"]["interpolate"] == "auto"
    assert input_hash(off) != input_hash(auto)


def point(alpha: float, choose_gain: float, choose_drift: float, confirm_drift: float) -> AlphaPoint:
    losses = TokenLosses(domain=1.0, general=1.0)
    return AlphaPoint(
        stage=1,
        alpha=alpha,
        choose=losses,
        confirm=losses,
        choose_gain=choose_gain,
        choose_drift=choose_drift,
        confirm_gain=choose_gain,
        confirm_drift=confirm_drift,
    )


def test_the_most_gain_within_budget_is_chosen_and_a_failed_confirmation_falls_back_to_the_next_that_holds():
    points = [point(0, 0, 0, 0), point(0.5, 0.2, 0.04, 0.04), point(0.75, 0.3, 0.05, 0.07), point(1, 0.4, 0.2, 0.2)]
    chosen, reason = choose(points, 0.05)
    assert chosen.alpha == 0.5  # 0.75 held on the choosing half, broke on the other; 1 broke on both
    assert "alpha 0.75 of stage 1" in reason and "broke the budget" in reason
    assert choose(points, 0.1)[0].alpha == 0.75
    assert choose([points[0], point(1, 0.4, 0.2, 0.2)], 0.05)[0].alpha == 0  # the base always holds


def test_gain_and_drift_are_measured_against_alpha_0_on_the_same_half():
    def losses(domain, general, general_eval=None):
        return TokenLosses(domain=domain, general=general, general_eval=general_eval)

    base = AlphaPoint(stage=1, alpha=0, choose=losses(2.0, 1.0, 4.0), confirm=losses(4.0, 2.0, 2.0))
    tuned = AlphaPoint(stage=1, alpha=1, choose=losses(1.0, 2.0, 4.4), confirm=losses(3.0, 2.0, 3.0))
    _, p = scored([base, tuned])
    assert (p.choose_gain, p.confirm_gain) == (0.5, 0.25)
    # judged on general_eval, as the gate judges, when the run has those rows
    assert p.choose_drift == pytest.approx(0.1) and p.confirm_drift == pytest.approx(0.5)


def mcq_file(folder: Path, rows: int = 24) -> Path:
    """Multiple-choice rows in the shape of the shared MCQ files: a question, options A-D, the letter."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["input,output,A,B,C,D"]
    for i in range(rows):
        options = [str(i + k) for k in range(4)]
        lines.append(f"What is {i} plus {i % 4}?,{'ABCD'[i % 4]},{','.join(options)}")
    path = folder / "mcq.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.e2e
def test_a_tiny_run_with_interpolate_auto_delivers_the_chosen_weights_and_records_them(
    prefect_harness, shared_cache, mlflow_db
):
    from mlflow.tracking import MlflowClient

    from flows.finetune import finetune
    from mixtune.core.config import validate_config
    from tests.conftest import tiny_raw_config

    budget = 0.05
    raw = tiny_raw_config(shared_cache, schedule={"shares": [1.0, 1.0], "samples_per_stage": 64})
    raw["validation"].update({"interpolate": "auto", "forgetting_budget": budget})
    template = "{input}\nA. {A}\nB. {B}\nC. {C}\nD. {D}"
    raw["data"]["sources"].append(
        {
            "path": str(mcq_file(shared_cache / "data")),
            "role": "general_eval",
            "columns": {"prompt_template": template, "response": "output"},
            "eval": {"metric": "loglik_choice"},
        }
    )
    summary = finetune(validate_config(raw, "test config", base_dir=shared_cache))

    blend = summary.interpolation
    assert [p.alpha for p in blend.points][:5] == [0, 0.25, 0.5, 0.75, 1]
    chosen = next(p for p in blend.points if p.alpha == blend.alpha and (p.stage == blend.stage or not blend.alpha))
    assert chosen.choose_drift <= budget and chosen.confirm_drift <= budget
    assert (summary.final_model, summary.final_losses, summary.final_stage) == (
        blend.model_dir,
        blend.losses,
        blend.stage,
    )
    if 0 < blend.alpha < 1:
        assert problem_with(blend.model_dir) is None
        AutoModelForCausalLM.from_pretrained(blend.model_dir)  # loads on its own, as the registry's copy must
    client = MlflowClient(summary.tracking_uri)
    parent = client.get_run(summary.parent_run_id)
    assert parent.data.tags[Tag.INTERPOLATION_ALPHA] == f"{blend.alpha:g}"
    history = client.get_metric_history(summary.parent_run_id, Metric.INTERPOLATION_ALPHA_TRIED)
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [p.alpha for p in blend.points]
    assert "plots/interpolation.png" in [a.path for a in client.list_artifacts(summary.parent_run_id, "plots")]
    # the MCQ metric, for the base (step 0) and every stage, like the other task metrics
    [name] = [n for n in parent.data.metrics if n.endswith("/loglik_choice") and n.startswith(TASK)]
    steps = sorted(m.step for m in client.get_metric_history(summary.parent_run_id, name))
    assert steps == [0, *[s.stage for s in summary.stages]]

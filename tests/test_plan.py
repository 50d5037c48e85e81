import pytest

from mixtune.core.config import Advisor
from tasks.plan import advice_differs, advise, apply_advice, epoch_plan, make_plan, rule_epochs
from tests.conftest import tiny_config
from tests.records import source_stats


@pytest.mark.parametrize(
    "samples, epochs",
    [
        (999_999, 2.0),
        (1_000_000, 1.0),
        (5_000_000, 1.0),
        (10_000, 2.0),
        (9_999, 3.0),
        (500, 3.0),
    ],
)
def test_epochs_follow_data_volume_at_the_boundaries(samples, epochs):
    assert rule_epochs(samples, Advisor())[0] == epochs


@pytest.mark.parametrize("domain, method", [(4_999, "lora"), (5_000, "full"), (200_000, "full")])
def test_scarce_domain_data_gets_lora(tmp_path, domain, method):
    advice = advise(domain, 50_000, 0, tiny_config(tmp_path))
    assert advice.method == method
    assert any(r.startswith(f"method {method}") for r in advice.reasons)
    if method == "full":
        assert advice.shares[0] == pytest.approx(0.1) and advice.shares[-1] == pytest.approx(0.5)
        assert len(advice.shares) == 4
    else:
        assert advice.shares == [0.5]


def test_advised_stage_sizes_reach_the_epoch_budget(tmp_path):
    config = tiny_config(tmp_path)
    advice = advise(20_000, 100_000, 0, config)  # tens of thousands: 2 epochs, full SFT
    assert advice.domain_epochs == 2.0
    planned = apply_advice(config, advice)
    plan = epoch_plan(advice.shares, planned.schedule.samples_per_stage, planned.train.epochs, 20_000, 100_000, planned)
    assert plan.stages[-1].cumulative_domain_epochs == pytest.approx(2.0, abs=0.01)
    assert plan.warnings == []


def test_knowledge_goal_means_continued_pretraining_first(tmp_path):
    config = tiny_config(tmp_path)
    config.goal = "knowledge"
    advice = advise(8_000, 10_000, 0, config)
    assert advice.pretrain_first
    assert any("continued pre-training first" in r and "add the domain's plain text" in r for r in advice.reasons)
    assert apply_advice(config, advice).pretrain.enabled is True


def test_epoch_accounting_per_stage_and_in_total(tmp_path):
    config = tiny_config(tmp_path)
    plan = epoch_plan([0.1, 0.3, 0.5], 1000, 1.0, domain_pool=900, general_pool=5000, config=config)
    assert [s.domain_samples for s in plan.stages] == [100, 300, 500]
    assert [round(s.domain_epochs, 4) for s in plan.stages] == [0.1111, 0.3333, 0.5556]
    assert plan.stages[-1].cumulative_domain_epochs == pytest.approx(1.0)
    assert plan.stages[0].general_epochs == pytest.approx(900 / 5000)
    assert plan.samples_per_stage == 1000 and plan.warnings == []


def test_stages_shrink_to_keep_a_small_domain_set_within_budget(tmp_path):
    config = tiny_config(tmp_path)
    plan = epoch_plan([0.5, 0.5, 0.5], 1000, 2.0, domain_pool=300, general_pool=5000, config=config)
    # 300 samples earn 3 epochs; 3 stages x 500 x 2 passes would show them 10x
    assert plan.samples_per_stage == 300
    assert plan.stages[-1].cumulative_domain_epochs == pytest.approx(3.0)
    assert "10.00x" in plan.warnings[0] and "from 1,000 to 300" in plan.warnings[0]


def test_unmeetable_budget_warns_with_numbers(tmp_path):
    config = tiny_config(tmp_path)
    plan = epoch_plan([0.5, 0.5, 0.5, 0.5], 1000, 1.0, domain_pool=40, general_pool=5000, config=config)
    floor = config.train.batch_size * config.advisor.min_steps_per_stage
    assert plan.samples_per_stage == floor
    assert len(plan.warnings) == 2 and "cannot meet the budget" in plan.warnings[1]
    assert plan.stages[-1].cumulative_domain_epochs > 3


def test_make_plan_auto_uses_the_advice_and_manual_keeps_the_config(tmp_path):
    stats = {"g": source_stats("general", train=3000), "d": source_stats("domain", train=600)}
    manual = make_plan(tiny_config(tmp_path), stats)
    assert manual.config.train.method == "full" and manual.config.schedule.shares is None
    auto_config = tiny_config(tmp_path)
    auto_config.plan = "auto"
    auto = make_plan(auto_config, stats)
    assert auto.config.train.method == "lora" and auto.config.schedule.shares == [0.5]
    assert "method lora" in auto.text and "Plan (auto" in auto.text


def test_advice_is_one_short_note_and_only_when_it_differs_from_the_plan(tmp_path):
    config = tiny_config(tmp_path)  # full SFT, 3 stages
    scarce = advise(400, 50_000, 0, config)
    note = advice_differs(scarce, config)
    assert note == "advice differs: method lora, schedule 0.50 (see mixtune advise)"
    assert advice_differs(scarce, apply_advice(config, scarce)) is None


@pytest.mark.parametrize("role", ["domain", "general"])
@pytest.mark.parametrize("pool, cut", [(60, False), (59, True)])
def test_every_pool_is_kept_within_its_epoch_budget_at_the_boundary(tmp_path, role, pool, cut):
    config = tiny_config(tmp_path)
    # shares 0.5 x 3 stages of 120 samples draw 180 rows from each pool: exactly 3 passes over 60
    pools = {"domain_pool": 10_000, "general_pool": 10_000, f"{role}_pool": pool}
    plan = epoch_plan([0.5, 0.5, 0.5], 120, 1.0, config=config, **pools)
    last = plan.stages[-1]
    seen = last.cumulative_domain_epochs if role == "domain" else last.cumulative_general_epochs
    if cut:
        assert plan.samples_per_stage == 118 and seen <= 3.0
        assert plan.warnings == [
            f"{role} pool of 59 would be seen 3.05x, over its budget of 3x: samples_per_stage lowered from 120 to 118"
        ]
    else:
        assert plan.samples_per_stage == 120 and seen == pytest.approx(3.0) and plan.warnings == []


def test_auto_plan_caps_general_repeats_of_a_small_general_set(tmp_path):
    config = tiny_config(tmp_path)
    config.plan = "auto"
    plan = make_plan(config, {"g": source_stats("general", train=887), "d": source_stats("domain", train=5452)})
    assert plan.epochs.stages[-1].cumulative_general_epochs <= 3.0 + 1e-9
    assert plan.epochs.stages[-1].cumulative_domain_epochs <= 3.0 + 1e-9
    assert any(
        r.startswith("warning: general epochs capped at 3") and "887 general samples" in r for r in plan.advice.reasons
    )
    assert "general pool 887 (budget 3 epochs)" in plan.text


@pytest.mark.parametrize(
    "path, method, given, rate",
    [
        (None, "full", None, 1e-3),
        (None, "lora", None, 1e-3),
        ("/models/pretrained", "full", None, 2e-5),
        ("/models/pretrained", "lora", None, 1e-4),
        ("/models/pretrained", "full", 3e-4, 3e-4),
    ],
)
def test_learning_rate_defaults_follow_the_kind_of_model(tmp_path, path, method, given, rate):
    config = tiny_config(tmp_path)
    config.model.path, config.train.method, config.train.learning_rate = path, method, given
    assert config.train_learning_rate()[0] == rate
    assert config.pretrain_learning_rate()[0] == (3e-3 if path is None else 5e-5)
    plan = make_plan(config, {"g": source_stats("general", train=3000), "d": source_stats("domain", train=600)})
    assert f"learning rate {rate:g}: " in plan.text
    advised = [r for r in plan.advice.reasons if r.startswith("learning rate")]
    lora_rate = given or (1e-4 if path else 1e-3)  # 600 domain samples: the advice is LoRA
    assert len(advised) == 1 and advised[0].startswith(f"learning rate {lora_rate:g} for lora: ")
    if path and given is None:
        assert ("LoRA on a pretrained model" if method == "lora" else "full SFT of a pretrained model") in plan.text

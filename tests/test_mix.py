import pandas as pd
import pytest

from mixtune.core.config import Schedule
from tasks.mix import draw, mix_stage
from tasks.schedule import stage_shares


def test_linear_schedule_from_ten_to_fifty_percent():
    assert stage_shares(Schedule(start=0.1, end=0.5, stages=4)) == pytest.approx([0.1, 0.2333333, 0.3666667, 0.5])


def test_other_shapes_and_explicit_list():
    cosine = stage_shares(Schedule(start=0.1, end=0.5, stages=5, shape="cosine"))
    assert cosine[0] == pytest.approx(0.1) and cosine[-1] == pytest.approx(0.5)
    assert cosine[1] - cosine[0] < cosine[2] - cosine[1]  # slow start
    assert stage_shares(Schedule(start=0.1, end=0.5, stages=4, shape="step")) == [0.1, 0.1, 0.5, 0.5]
    assert stage_shares(Schedule(shares=[0.2, 0.3])) == [0.2, 0.3]
    assert stage_shares(Schedule(start=0.1, end=0.5, stages=1)) == [0.5]


def pool(n_domain: int, n_general: int) -> pd.DataFrame:
    rows = [{"sample_id": f"d{i}", "source": "d", "tag": "domain", "n_tokens": 30} for i in range(n_domain)]
    rows += [{"sample_id": f"g{i}", "source": "g", "tag": "general", "n_tokens": 10} for i in range(n_general)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("share", [0.1, 0.2333, 0.3667, 0.5, 0.07])
def test_realised_share_is_counted_from_the_draw(tmp_path, share):
    mix = mix_stage(pool(50, 500), stage=2, share=share, samples=300, seed=0, manifest=str(tmp_path / "m.parquet"))
    drawn = pd.read_parquet(tmp_path / "m.parquet")
    assert mix.realised_share == pytest.approx((drawn["tag"] == "domain").mean())
    assert abs(mix.realised_share - share) <= 0.01
    assert mix.samples == len(drawn) == 300
    assert mix.realised_token_share > mix.realised_share  # domain rows are longer here


def test_epochs_fold_into_the_sequence_with_a_fresh_order_per_pass(tmp_path):
    mix = mix_stage(pool(50, 500), 1, 0.2, 100, seed=0, manifest=str(tmp_path / "m.parquet"), epochs=2.5)
    sequence = pd.read_parquet(mix.manifest)
    assert len(sequence) == 250
    first, second = sequence["sample_id"][:100], sequence["sample_id"][100:200]
    assert sorted(first) == sorted(second) and list(first) != list(second)
    assert mix.domain_epochs == pytest.approx(50 / 50)


def test_draw_is_deterministic_and_repeats_only_past_the_pool(tmp_path):
    a = mix_stage(pool(40, 400), 1, 0.5, 200, seed=3, manifest=str(tmp_path / "a.parquet"))
    b = mix_stage(pool(40, 400), 1, 0.5, 200, seed=3, manifest=str(tmp_path / "b.parquet"))
    assert pd.read_parquet(a.manifest).equals(pd.read_parquet(b.manifest))
    assert a.domain_epochs == pytest.approx(2.5)
    assert a.source_epochs == {"d": pytest.approx(2.5), "g": pytest.approx(0.25)}
    import numpy as np

    once = draw(pool(40, 0), 40, np.random.default_rng(0))
    assert once["sample_id"].is_unique
    twice = draw(pool(40, 0), 80, np.random.default_rng(0))
    assert twice["sample_id"].value_counts().eq(2).all()

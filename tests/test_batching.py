"""train.batching: grouped, padded and packed batches train on the same samples with the same loss; grouping is
a fixed function of the lengths and the seed (a resumed stage sees the same batches)."""

import pytest
import torch
from torch.utils.data import Subset

from mixtune.core.config import Train
from tasks.lm import PackCollator, PadCollator, length_grouped_order, token_loss_sum
from tasks.tables import IGNORE, TokenDataset
from tests.test_packing import PAD, samples, tiny_model

BATCH, WINDOW = 4, 3


def mean_loss_over(model, data: list[dict], collate, order: list[int]) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(order), BATCH):
            batch = collate([data[i] for i in order[start : start + BATCH]])
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_sample_tokens")}
            total += float(token_loss_sum(model(**inputs).logits, batch["labels"]))
            count += int((batch["labels"][:, 1:] != IGNORE).sum())
    return total / count


def test_the_loss_over_the_same_samples_is_the_same_for_every_batching():
    model, data = tiny_model(), samples(n=26)
    lengths = [len(s["input_ids"]) for s in data]
    grouped = length_grouped_order(lengths, BATCH, seed=3, window=WINDOW)
    stage_order = list(range(len(data)))
    padded = mean_loss_over(model, data, PadCollator(PAD), stage_order)
    assert mean_loss_over(model, data, PadCollator(PAD), grouped) == pytest.approx(padded, rel=1e-5)
    for row_len in (24, 64):
        assert mean_loss_over(model, data, PackCollator(PAD, row_len), stage_order) == pytest.approx(padded, rel=1e-5)


def test_grouping_reorders_within_windows_and_cuts_padding():
    lengths = [len(s["input_ids"]) for s in samples(n=26)]
    order = length_grouped_order(lengths, BATCH, seed=3, window=WINDOW)
    span = BATCH * WINDOW
    for start in range(0, len(lengths), span):  # each window keeps its own samples: the mix stays where it was
        assert sorted(order[start : start + span]) == list(range(start, min(start + span, len(lengths))))
    batches = [order[i : i + BATCH] for i in range(0, len(order), BATCH)]
    for batch in batches:
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
    assert len(batches[-1]) == len(lengths) % BATCH  # the short remainder comes last

    def padded_tokens(batches_of: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in batches_of)

    in_stage_order = [list(range(i, min(i + BATCH, len(lengths)))) for i in range(0, len(lengths), BATCH)]
    assert padded_tokens(batches) < padded_tokens(in_stage_order)


def test_grouping_is_a_function_of_lengths_and_seed():
    lengths = [len(s["input_ids"]) for s in samples(n=64)]
    first = length_grouped_order(lengths, BATCH, seed=3, window=WINDOW)
    assert length_grouped_order(list(lengths), BATCH, seed=3, window=WINDOW) == first
    assert length_grouped_order(lengths, BATCH, seed=4, window=WINDOW) != first
    data = TokenDataset({"input_ids": [[i] * n for i, n in enumerate(lengths)], "labels": [[0] * n for n in lengths]})
    view = Subset(data, first)
    assert len(view) == len(data) and view[5] == data[first[5]]


@pytest.mark.parametrize(("packing", "batching"), [(True, "packed"), (False, "padded")])
def test_old_configs_packing_reads_as_batching(packing, batching):
    assert Train.model_validate({"packing": packing}).batching == batching


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"packing": True, "batching": "grouped"}, "train.batching"),
        ({"packing": "yes"}, "train.packing"),
        ({"batching": "sorted"}, "batching"),
        ({"packed_row_len": 4}, "packed_row_len"),
    ],
)
def test_bad_batching_is_refused_naming_the_field(raw, named):
    with pytest.raises(ValueError, match=named):
        Train.model_validate(raw)

"""The loss a slice of positions at a time: the same value and the same gradients as HF's whole-batch loss,
while the full-vocabulary logits are held once."""

import pytest
import torch

from tasks import lm
from tasks.lm import PackCollator, PadCollator, mean_token_loss_of_step, token_loss_sum
from tests.test_packing import PAD, samples, tiny_model


def without_labels(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("labels", lm.TOKENS)}


@pytest.mark.parametrize("collate", [PadCollator(PAD), PackCollator(PAD, row_len=32)], ids=["padded", "packed"])
@pytest.mark.parametrize("lora", [False, True])
def test_sliced_loss_and_gradients_equal_the_whole_batch_loss(monkeypatch, collate, lora):
    monkeypatch.setattr(lm, "CHUNK_ELEMENTS", 97 * 3)  # a few positions per slice: many slices, a ragged last one
    model, batch = tiny_model(lora).train(), collate(samples())
    reference = model(**{k: v for k, v in batch.items() if k != lm.TOKENS}).loss
    expected = torch.autograd.grad(reference, [p for p in model.parameters() if p.requires_grad])

    sliced = mean_token_loss_of_step(model(**without_labels(batch)), batch["labels"])
    got = torch.autograd.grad(sliced, [p for p in model.parameters() if p.requires_grad])
    assert torch.allclose(sliced, reference, rtol=1e-5, atol=0)
    assert all(torch.allclose(g, e, rtol=1e-4, atol=1e-7) for g, e in zip(got, expected, strict=True))


def test_a_slice_is_sized_by_the_vocabulary_and_batch(monkeypatch):
    monkeypatch.setattr(lm, "CHUNK_ELEMENTS", 1000)
    widths = []
    monkeypatch.setattr(lm, "slice_loss", lambda logits, targets: widths.append(targets.shape[1]) or logits.sum() * 0)
    token_loss_sum(torch.zeros(2, 40, 100), torch.zeros(2, 40, dtype=torch.long))
    assert widths == [5] * 7 + [4]  # 1000 // (2 x 100) positions a slice; 39 positions predict a next token

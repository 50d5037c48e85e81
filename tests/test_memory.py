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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_loss_written_over_its_logits_equals_torch_cross_entropy(monkeypatch, dtype):
    monkeypatch.setattr(lm, "CHUNK_ELEMENTS", 3 * 2 * 11)  # 3 positions a slice of 2 rows x 11 tokens
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 8, 11, generator=generator).to(dtype)
    labels = torch.randint(0, 11, (2, 8), generator=generator)
    labels[0, 3:5] = lm.IGNORE
    mine, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()

    (token_loss_sum(mine * 1, labels) / 3).backward()  # a scaled loss: backward scales the gradient
    flat = theirs[:, :-1].float().reshape(-1, 11)
    expected = torch.nn.functional.cross_entropy(
        flat, labels[:, 1:].reshape(-1), ignore_index=lm.IGNORE, reduction="sum"
    )
    (expected / 3).backward()
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(token_loss_sum(logits, labels), expected, rtol=1e-5, atol=0)
    assert torch.allclose(mine.grad.float(), theirs.grad.float(), rtol=tolerance, atol=tolerance)


def test_the_loss_gradient_can_be_taken_once():
    logits = torch.randn(2, 6, 5, requires_grad=True)
    loss = token_loss_sum(logits * 1, torch.zeros(2, 6, dtype=torch.long))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="taken once"):
        loss.backward()

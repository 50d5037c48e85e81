"""Packed batches train on exactly what padded batches do: the same loss, no attention across samples,
positions restarting per sample; full models and LoRA alike."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from tasks.lm import PackCollator, PadCollator
from tasks.tables import IGNORE

PAD = 0


def tiny_model(lora: bool = False):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=PAD,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    if lora:
        model = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
    return model.eval()


def samples(seed: int = 1, n: int = 7) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 20, (1,), generator=g))
        ids = torch.randint(1, 97, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return out


def loss(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).loss


@pytest.mark.parametrize("lora", [False, True])
def test_packed_loss_equals_the_padded_loss(lora):
    model, batch = tiny_model(lora), samples()
    padded = loss(model, PadCollator(PAD)(batch))
    packed_batch = PackCollator(PAD, row_len=32)(batch)
    assert packed_batch["input_ids"].shape[0] < len(batch)  # several samples share a row
    assert torch.allclose(loss(model, packed_batch), padded, rtol=1e-5, atol=0)


def test_no_sample_sees_another():
    model, batch = tiny_model(), samples()
    collate = PackCollator(PAD, row_len=64)
    before = model(**collate(batch)).logits
    changed = [dict(b) for b in batch]
    changed[2] = {"input_ids": [5] * len(batch[2]["input_ids"]), "labels": batch[2]["labels"]}
    after = model(**collate(changed)).logits
    spans, start = [], 0
    for row in collate.rows([len(b["input_ids"]) for b in batch]):
        for i in row:
            n = len(batch[i]["input_ids"])
            spans.append((i, start, start + n))
            start += n
        break  # every sample here fits the first row
    moved = {i for i, a, b in spans if not torch.equal(before[0, a:b], after[0, a:b])}
    assert moved == {2}


def test_positions_restart_per_sample_and_first_labels_are_not_targets():
    batch = samples(n=4)
    packed = PackCollator(PAD, row_len=64)(batch)
    start = 0
    for b in batch:
        n = len(b["input_ids"])
        assert packed["position_ids"][0, start : start + n].tolist() == list(range(n))
        assert packed["labels"][0, start] == IGNORE
        assert packed["labels"][0, start + 1 : start + n].tolist() == b["labels"][1:]
        start += n
    assert "attention_mask" not in packed  # boundaries come from the positions alone


def test_validation_loss_is_the_same_packed_or_padded():
    from tasks.lm import mean_token_loss
    from tasks.tables import TokenDataset

    data = samples(n=9)
    dataset = TokenDataset({"input_ids": [b["input_ids"] for b in data], "labels": [b["labels"] for b in data]})
    padded = mean_token_loss(tiny_model(), dataset, PadCollator(PAD), batch_size=4)
    packed = mean_token_loss(tiny_model(), dataset, PackCollator(PAD, row_len=40), batch_size=4)
    assert packed == pytest.approx(padded, rel=1e-5)

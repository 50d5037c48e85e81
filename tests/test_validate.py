import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tasks.guard import gate
from tasks.lm import PadCollator, TokenDataset, evaluation_batches, mean_token_loss


def test_gate_continues_within_the_budget_and_stops_beyond():
    assert gate(2.15, 2.0, budget=0.10).decision == "continue"
    assert gate(1.9, 2.0, budget=0.10).decision == "continue"
    stop = gate(2.21, 2.0, budget=0.10)
    assert stop.decision == "stop"
    assert stop.general_drift == pytest.approx(0.105)
    assert "2.2100" in stop.reason and "2.0000" in stop.reason and "10%" in stop.reason


def test_token_loss_does_not_depend_on_batch_size():
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=32,
        )
    )
    import pandas as pd

    rows = [{"input_ids": list(range(1, n)), "labels": [-100] * 2 + list(range(3, n))} for n in (6, 9, 14, 20, 7)]
    data = TokenDataset(pd.DataFrame(rows))
    collator = PadCollator(pad_id=0)
    losses = [mean_token_loss(model, data, collator, batch_size=b) for b in (1, 2, 5)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) == pytest.approx(losses[2], rel=1e-5)


def test_evaluation_batches_hold_similar_lengths_within_the_configured_batchs_tokens():
    lengths = [40, 3, 7, 40, 5, 12, 3, 39, 8, 6]
    batches = evaluation_batches(lengths, batch_size=2)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    widths = [max(lengths[i] for i in batch) for batch in batches]
    assert widths == sorted(widths)  # shortest first, so a batch pads only to samples of its own length
    assert all(len(batch) * max(lengths[i] for i in batch) <= 2 * 40 for batch in batches)
    assert len(batches[0]) > 2  # short samples share a batch larger than the configured one

"""PPO's data side without a model: left padding, completion windows, values, content lengths."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from trainers.ppo_rollout import (
    PPOModels,
    Rollout,
    completion_outputs,
    content_lengths,
    forward,
    left_pad,
)

EOS, PAD = 2, 0


class RecordingPolicy(torch.nn.Module):
    """Logits and hidden states that encode their position, so windows can be checked by value."""

    def __init__(self, vocab: int = 5, hidden: int = 3) -> None:
        super().__init__()
        self.vocab, self.hidden = vocab, hidden
        self.seen: dict[str, torch.Tensor] = {}

    def forward(self, input_ids, attention_mask, position_ids, output_hidden_states):
        self.seen = {"attention_mask": attention_mask, "position_ids": position_ids}
        batch, width = input_ids.shape
        where = torch.arange(width, dtype=torch.float).view(1, width, 1)
        logits = where.expand(batch, width, self.vocab).clone()
        hidden = where.expand(batch, width, self.hidden).clone()
        return SimpleNamespace(logits=logits, hidden_states=[hidden * 0, hidden])


def test_left_pad_puts_prompts_against_the_completion() -> None:
    ids, mask = left_pad([[5, 6, 7], [8]], PAD, torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [PAD, PAD, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_completion_window_temperature_and_positions() -> None:
    policy = RecordingPolicy()
    sequences = torch.tensor([[0, 5, 6, 7, 8], [5, 6, 7, 8, 9]])
    attention = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    logits, hidden = completion_outputs(policy, sequences, attention, prompt_width=3, temperature=2.0)
    # positions 2 and 3 predict the completion tokens at 3 and 4
    assert logits.shape == (2, 2, 5) and logits[0, :, 0].tolist() == [1.0, 1.5]
    assert hidden[1, :, 0].tolist() == [2.0, 3.0]
    assert policy.seen["position_ids"].tolist() == [[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]]


def test_forward_reads_values_from_the_value_head() -> None:
    value_head = torch.nn.Linear(3, 1)
    with torch.no_grad():
        value_head.weight.fill_(1.0)
        value_head.bias.fill_(0.5)
    models = PPOModels(RecordingPolicy(), value_head, torch.nn.Linear(3, 1), reference_adapter=None)
    sequences = torch.tensor([[5, 6, 7, 8]])
    _, values = forward(models, sequences, torch.ones_like(sequences), prompt_width=2, temperature=1.0)
    assert values.tolist() == [[3 * 1.0 + 0.5, 3 * 2.0 + 0.5]]  # hidden = position, summed over 3 dims


def test_content_lengths_stop_before_eos() -> None:
    sequences = torch.tensor([[9, 9, 4, 3, EOS, PAD], [9, 9, EOS, PAD, PAD, PAD], [9, 9, 4, 4, 4, 4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])  # up to and including EOS
    zeros = torch.zeros(3, 4)
    batch = Rollout(sequences, torch.ones_like(sequences), mask, 2, zeros, zeros, zeros, torch.zeros(3))
    assert batch.responses.tolist() == [[4, 3, EOS, PAD], [EOS, PAD, PAD, PAD], [4, 4, 4, 4]]
    assert content_lengths(batch, EOS).tolist() == [2, 0, 4]

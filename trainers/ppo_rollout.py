"""PPO's data side: the one base with its adapters and heads, and sampling and scoring a batch.

Boundary: models and tensors in, a `Rollout` (samples with the log-probs, values and scores PPO
needs from the moment they were drawn) out. The algorithm that learns from rollouts is
`trainers.ppo`; the policy, reference and reward all run on one base, switched by adapter name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from trainers import losses
from trainers.registered_adapters import positions, reward_scores, use_adapter


class SamplingOptions(Protocol):
    """What sampling reads from the PPO config."""

    temperature: float
    max_new_tokens: int


@dataclass
class PPOModels:
    """The one base with its adapters, and the two small heads."""

    policy: Any  # peft.PeftModel: adapters "default" (trained), "reward", maybe "reference"
    value_head: torch.nn.Linear
    reward_head: torch.nn.Linear
    reference_adapter: str | None  # None: the base with adapters disabled
    reward_ref: str = ""  # the concrete registry reference of the reward adapter


@dataclass
class Rollout:
    """One batch of samples and everything PPO needs from the moment they were drawn."""

    sequences: torch.Tensor  # [B, P + R] left-padded prompt + completion
    attention_mask: torch.Tensor  # [B, P + R]
    mask: torch.Tensor  # [B, R] 1 on completion tokens up to and including EOS
    prompt_width: int
    logprobs: torch.Tensor  # [B, R] under the sampling policy
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor  # [B] reward-model scores

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_width :]


def completion_outputs(
    policy: Any, sequences: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tempered logits and last hidden states at the positions that predict the completion tokens."""
    out = policy(
        input_ids=sequences,
        attention_mask=attention_mask,
        position_ids=positions(attention_mask),
        output_hidden_states=True,
    )
    window = slice(prompt_width - 1, -1)
    return out.logits[:, window].float() / temperature, out.hidden_states[-1][:, window]


def forward(
    models: PPOModels,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_width: int,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy logits and values at the completion positions: ([B, R, V], [B, R])."""
    logits, hidden = completion_outputs(models.policy, sequences, attention_mask, prompt_width, temperature)
    values = models.value_head(hidden.to(models.value_head.weight.dtype)).squeeze(-1).float()
    return logits, values


def reference_logprobs(
    models: PPOModels,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_width: int,
    temperature: float,
) -> torch.Tensor:
    """Log-probs of the sampled tokens under the reference (adapters disabled, or "reference")."""
    with use_adapter(models.policy, models.reference_adapter):
        logits, _ = completion_outputs(models.policy, sequences, attention_mask, prompt_width, temperature)
    return losses.gather_logprobs(logits, sequences[:, prompt_width:])


def left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask (generation continues on the right)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def rollout(models: PPOModels, prompts: list[list[int]], tokenizer: Any, config: SamplingOptions) -> Rollout:
    """Sample completions, then score them: policy log-probs and values, reference, reward."""
    device = next(models.policy.parameters()).device
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id, device)
    sequences = models.policy.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        do_sample=True,
        temperature=config.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=config.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    width = prompt_ids.shape[1]
    responses = sequences[:, width:]
    is_eos = responses == tokenizer.eos_token_id
    mask = ((is_eos.long().cumsum(-1) - is_eos.long()) == 0).long()  # up to and including EOS
    attention_mask = torch.cat([prompt_mask, mask], dim=1)
    logits, values = forward(models, sequences, attention_mask, width, config.temperature)
    return Rollout(
        sequences=sequences,
        attention_mask=attention_mask,
        mask=mask,
        prompt_width=width,
        logprobs=losses.gather_logprobs(logits, responses),
        ref_logprobs=reference_logprobs(models, sequences, attention_mask, width, config.temperature),
        values=values,
        scores=reward_scores(models.policy, models.reward_head, sequences, attention_mask),
    )


def content_lengths(rollout: Rollout, eos_id: int) -> torch.Tensor:
    """Completion tokens before EOS, per sample (0 = an empty generation)."""
    return (rollout.mask * (rollout.responses != eos_id)).sum(-1)

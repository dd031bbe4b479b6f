"""Loss functions and statistics for preference tuning: reward model, DPO and PPO.

Every function here is pure (tensors in, tensors out, no model, no state) and states its formula in
its docstring, so the recipes (`trainers/reward.py`, `trainers/dpo.py`, `trainers/ppo.py`) read
as "run the model, call the loss", and the math is checked by hand in tests/trainers/test_losses.py.

Conventions: `mask` tensors are 1 for positions that count and 0 for padding / prompt tokens;
`labels` use -100 for positions to ignore (the HF convention); log-probabilities are natural logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Masked reductions
# ---------------------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over positions where `mask` is 1: sum(v * m) / max(sum(m), 1)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over masked positions: sum(m (v - mean)^2) / (n - 1), n = sum(m)."""
    mask = mask.to(values.dtype)
    mean = masked_mean(values, mask)
    n = mask.sum()
    sq = ((values - mean) ** 2 * mask).sum()
    return sq / (n - 1).clamp(min=1.0)


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten over masked positions: (v - mean) / sqrt(var + eps); masked-out positions become 0.

    With `shift_mean=False` the mean is added back (scale only), as PPO does for rewards.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


# ---------------------------------------------------------------------------------------------
# Log-probabilities
# ---------------------------------------------------------------------------------------------


def gather_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[..., tokens]: the log-probability of each given token.

    Args:
        logits: [B, T, V] scores already aligned with `tokens` (no shifting here).
        tokens: [B, T] token ids; negative ids (e.g. -100) are read as id 0, mask them yourself.

    Returns:
        [B, T] log-probabilities.
    """
    logps = F.log_softmax(logits.float(), dim=-1)
    return logps.gather(-1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Log-probability of each labelled sequence under a causal LM.

    log p(y | x) = sum_t [labels_{t+1} != -100] * log softmax(logits_t)[labels_{t+1}]
    (logits at position t predict the token at t + 1). With `average=True` the sum is divided by
    the number of labelled tokens (a length-normalised score).

    Args:
        logits: [B, T, V] causal-LM logits.
        labels: [B, T] target ids, -100 where the position is not scored (prompt, padding).

    Returns:
        [B] summed (or averaged) log-probabilities.
    """
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    mask = shift_labels != IGNORE_INDEX
    token_logps = gather_logprobs(shift_logits, shift_labels) * mask
    total = token_logps.sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the categorical distribution: H = -sum_v p_v log p_v.

    Computed as logsumexp(z) - sum_v softmax(z)_v z_v, which is stable for large logits.
    Returns a tensor shaped like `logits` without the last dimension.
    """
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def token_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact per-position KL(pi || ref) of two next-token distributions.

    KL_t = sum_v pi_t(v) (log pi_t(v) - log ref_t(v)); returns logits' shape without the last
    dimension. DPO's KL estimate is its masked mean over the eval responses' positions.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


# ---------------------------------------------------------------------------------------------
# Reward model and DPO
# ---------------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Bradley-Terry pairwise loss for a scalar reward model.

    P(chosen > rejected) = sigmoid(r_c - r_r), so loss = mean(-log sigmoid(r_c - r_r - m)),
    with an optional per-pair margin m (0 by default), as in Llama 2's reward model.
    """
    diff = chosen_rewards.float() - rejected_rewards.float()
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


@dataclass(frozen=True)
class DPOOutput:
    """Result of `dpo_loss`: the scalar loss and the per-pair implicit rewards."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> DPOOutput:
    """Direct Preference Optimization sigmoid loss (Rafailov et al. 2023).

    Implicit rewards r_c = beta (log pi(y_c|x) - log ref(y_c|x)), r_r likewise for y_r;
    h = r_c - r_r; loss = mean(-(1 - eps) log sigmoid(h) - eps log sigmoid(-h)), where eps is
    the label smoothing of conservative DPO (0 gives plain DPO). Returned rewards are detached.
    """
    chosen_rewards = beta * (policy_chosen_logps.float() - ref_chosen_logps.float())
    rejected_rewards = beta * (policy_rejected_logps.float() - ref_rejected_logps.float())
    h = chosen_rewards - rejected_rewards
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return DPOOutput(losses.mean(), chosen_rewards.detach(), rejected_rewards.detach())


def preference_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """Pairwise accuracy mean(r_c > r_r) (ties count as wrong) and mean margin mean(r_c - r_r)."""
    diff = chosen_rewards.float() - rejected_rewards.float()
    return {
        "accuracy": float((diff > 0).float().mean()) if diff.numel() else 0.0,
        "margin": float(diff.mean()) if diff.numel() else 0.0,
    }


# ---------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------


def kl_penalty_rewards(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards of the InstructGPT recipe.

    kl_t = log pi(a_t) - log ref(a_t) (the sampled-token KL estimate);
    r_t = -kl_coef * kl_t for every response token, plus the reward-model score on the last
    response token of each row (the last position where mask is 1).

    Args:
        logprobs: [B, T] log-probs of the sampled tokens under the policy that sampled them.
        ref_logprobs: [B, T] the same under the reference.
        scores: [B] reward-model scores.
        mask: [B, T] 1 on response tokens.
        kl_coef: the KL penalty coefficient beta.

    Returns:
        (rewards [B, T], kl [B, T]), both zero outside the mask.
    """
    maskf = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * maskf
    rewards = -kl_coef * kl
    # The last response token is the only masked position whose running count reaches the total.
    last = (maskf.cumsum(-1) == maskf.sum(-1, keepdim=True)) & mask.bool()
    rewards = rewards + last.to(rewards.dtype) * scores.to(rewards.dtype).unsqueeze(-1)
    return rewards, kl


def leave_one_out_centering(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Centre each score on the mean of the other samples of its prompt (RLOO's baseline).

    Scores come in consecutive groups of `group_size` samples of one prompt:
    s_i - (sum_group - s_i) / (k - 1). With k = 1 the scores are returned unchanged.
    """
    if group_size <= 1:
        return scores
    grouped = scores.view(-1, group_size)
    others = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).view_as(scores)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016) over response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with V and A
    beyond the last response token taken as 0 (the episode ends); returns R_t = A_t + V_t.
    Responses are right-padded: positions where mask is 0 come after the episode.

    Returns:
        (advantages [B, T], returns [B, T]), zero outside the mask.
    """
    maskf = mask.to(values.dtype)
    values = values * maskf
    rewards = rewards * maskf
    steps = rewards.shape[-1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = (delta + gamma * lam * next_adv) * maskf[:, t]
        advantages[:, t] = adv
        next_value, next_adv = values[:, t], adv
    returns = (advantages + values) * maskf
    return advantages, returns


@dataclass(frozen=True)
class PolicyLossOutput:
    """Result of `clipped_policy_loss`: loss plus clip fraction and approximate KL (detached)."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def approx_kl(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(old || new) over masked tokens: mean(exp(d) - 1 - d), d = new - old.

    Non-negative and unbiased for samples drawn from the old policy (Schulman, "Approximating KL").
    """
    d = logprobs.float() - old_logprobs.float()
    return masked_mean(torch.expm1(d) - d, mask)


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> PolicyLossOutput:
    """PPO clipped surrogate (Schulman et al. 2017), to minimise.

    ratio = exp(log pi - log pi_old); loss = masked_mean(max(-A ratio, -A clip(ratio, 1-c, 1+c)));
    clip_fraction = share of tokens where the clipped term is the larger one.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return PolicyLossOutput(loss, clip_fraction.detach(), approx_kl(logprobs.detach(), old_logprobs, mask))


def clipped_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped value loss.

    v_clip = old_v + clip(v - old_v, -c, c);
    loss = 0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2));
    clip_fraction = share of tokens where the clipped error is the larger one.

    Returns:
        (loss, clip_fraction)
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    err = (values - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    return loss, masked_mean((err_clipped > err).float(), mask).detach()

"""Hand-computed checks of trainers/losses.py: every value below is worked out in the comments."""

from __future__ import annotations

import math

import pytest
import torch

from trainers import losses


def close(actual: torch.Tensor | float, expected: float, tol: float = 1e-5) -> bool:
    return abs(float(actual) - expected) < tol


def test_masked_mean_and_whiten() -> None:
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert close(losses.masked_mean(values, mask), 2.0)  # (1 + 2 + 3) / 3
    assert close(losses.masked_var(values, mask), 1.0)  # ((-1)^2 + 0 + 1^2) / (3 - 1)
    white = losses.masked_whiten(values, mask, eps=0.0)
    assert torch.allclose(white, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    scaled = losses.masked_whiten(values, mask, shift_mean=False, eps=0.0)
    assert torch.allclose(scaled, torch.tensor([[1.0, 2.0, 3.0, 0.0]]))  # var 1: only mean back


def test_gather_and_sequence_logprobs() -> None:
    # Uniform logits over 4 tokens: every token has log-prob log(1/4).
    logits = torch.zeros(1, 4, 4)
    labels = torch.tensor([[-100, 2, 3, -100]])  # positions 1 and 2 are scored
    # Position 0 predicts labels[1], position 1 predicts labels[2]: two tokens of log(1/4).
    assert close(losses.sequence_logprobs(logits, labels), 2 * math.log(0.25))
    assert close(losses.sequence_logprobs(logits, labels, average=True), math.log(0.25))
    # A peaked distribution: logits [ln 3, 0] -> p = [3/4, 1/4].
    peaked = torch.tensor([[[math.log(3.0), 0.0]]])
    assert close(losses.gather_logprobs(peaked, torch.tensor([[0]])), math.log(0.75))
    assert close(losses.gather_logprobs(peaked, torch.tensor([[1]])), math.log(0.25))


def test_entropy_and_token_kl() -> None:
    uniform = torch.zeros(1, 1, 4)
    assert close(losses.entropy_from_logits(uniform), math.log(4))  # H(uniform over 4) = ln 4
    peaked = torch.tensor([[[math.log(3.0), 0.0]]])  # p = [3/4, 1/4]
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert close(losses.entropy_from_logits(peaked), h)
    # KL([3/4, 1/4] || [1/2, 1/2]) = 3/4 ln(3/2) + 1/4 ln(1/2)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert close(losses.token_kl(peaked, torch.zeros(1, 1, 2)), kl)
    assert close(losses.token_kl(peaked, peaked), 0.0)


def test_bradley_terry_loss() -> None:
    # r_c - r_r = 0 -> -log sigmoid(0) = ln 2; r_c - r_r = 2 -> ln(1 + e^-2).
    chosen, rejected = torch.tensor([1.0, 3.0]), torch.tensor([1.0, 1.0])
    expected = (math.log(2) + math.log1p(math.exp(-2))) / 2
    assert close(losses.bradley_terry_loss(chosen, rejected), expected)
    # A margin of 2 on the second pair brings it back to ln 2.
    margin = torch.tensor([0.0, 2.0])
    assert close(losses.bradley_terry_loss(chosen, rejected, margin), math.log(2))


def test_dpo_loss_rewards_and_metrics() -> None:
    out = losses.dpo_loss(
        policy_chosen_logps=torch.tensor([-1.0, -5.0]),
        policy_rejected_logps=torch.tensor([-3.0, -2.0]),
        ref_chosen_logps=torch.tensor([-2.0, -4.0]),
        ref_rejected_logps=torch.tensor([-2.0, -2.0]),
        beta=0.5,
    )
    # Pair 1: r_c = 0.5 (-1 + 2) = 0.5, r_r = 0.5 (-3 + 2) = -0.5, h = 1.
    # Pair 2: r_c = 0.5 (-5 + 4) = -0.5, r_r = 0, h = -0.5.
    assert torch.allclose(out.chosen_rewards, torch.tensor([0.5, -0.5]))
    assert torch.allclose(out.rejected_rewards, torch.tensor([-0.5, 0.0]))
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
    assert close(out.loss, expected)
    metrics = losses.preference_metrics(out.chosen_rewards, out.rejected_rewards)
    assert metrics == pytest.approx({"accuracy": 0.5, "margin": 0.25})  # (1 - 0.5) / 2
    # Label smoothing 0.5 weighs both directions equally: 0.5 (ln(1+e^-h) + ln(1+e^h)) per pair.
    smooth = losses.dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]),
        beta=0.5, label_smoothing=0.5,
    )  # fmt: skip
    assert close(smooth.loss, 0.5 * (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))))


def test_dpo_loss_has_gradient_only_through_policy() -> None:
    policy_c = torch.tensor([-1.0], requires_grad=True)
    out = losses.dpo_loss(policy_c, torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-1.0]))
    out.loss.backward()
    # d/dx of -log sigmoid(beta x) at x = 0 is -beta * sigmoid(0) = -0.05 for beta 0.1.
    assert close(policy_c.grad[0], -0.05)


def test_kl_penalty_rewards() -> None:
    logprobs = torch.tensor([[-1.0, -1.0, -2.0, 0.0], [-1.0, -1.0, 0.0, 0.0]])
    ref = torch.tensor([[-2.0, -1.0, -1.0, 0.0], [-1.5, -0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    rewards, kl = losses.kl_penalty_rewards(logprobs, ref, torch.tensor([10.0, -4.0]), mask, 0.1)
    # kl row 0 = [1, 0, -1, 0]; row 1 = [0.5, -0.5, 0, 0]; score lands on the last masked token.
    assert torch.allclose(kl, torch.tensor([[1.0, 0.0, -1.0, 0.0], [0.5, -0.5, 0.0, 0.0]]))
    expected = torch.tensor([[-0.1, 0.0, 0.1 + 10.0, 0.0], [-0.05, 0.05 - 4.0, 0.0, 0.0]])
    assert torch.allclose(rewards, expected)


def test_leave_one_out_centering() -> None:
    scores = torch.tensor([1.0, 2.0, 6.0, 10.0, 10.0, 10.0])
    # group 1: 1 - (2 + 6) / 2 = -3, 2 - (1 + 6) / 2 = -1.5, 6 - (1 + 2) / 2 = 4.5; group 2: all 0
    centred = losses.leave_one_out_centering(scores, 3)
    assert torch.allclose(centred, torch.tensor([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0]))
    assert torch.equal(losses.leave_one_out_centering(scores, 1), scores)


def test_gae_hand_computed() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])  # the last position is padding: reward and value ignored
    adv, ret = losses.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # t=2: delta = 1 + 0 - 0.5 = 0.5, A = 0.5
    # t=1: delta = 0 + 0.5 - 0.5 = 0,  A = 0 + 0.5 * 0.5 = 0.25
    # t=0: delta = 0,                  A = 0 + 0.5 * 0.25 = 0.125
    assert torch.allclose(adv, torch.tensor([[0.125, 0.25, 0.5, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[0.625, 0.75, 1.0, 0.0]]))
    # gamma = lam = 1 gives Monte-Carlo advantages: return-to-go minus value.
    adv1, ret1 = losses.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert torch.allclose(ret1, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    assert torch.allclose(adv1, torch.tensor([[0.5, 0.5, 0.5, 0.0]]))


def test_clipped_policy_loss() -> None:
    # ratios e^{ln 1.5} = 1.5 and e^{ln 0.5} = 0.5, clip 0.2 -> [0.8, 1.2].
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 0]])
    out = losses.clipped_policy_loss(logprobs, old, adv, mask, clip_range=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5 (unclipped)
    assert close(out.loss, (-1.2 - 0.5) / 2)
    assert close(out.clip_fraction, 0.5)
    # k3: d = ln 1.5 -> 0.5 - ln 1.5; d = ln 0.5 -> -0.5 - ln 0.5
    k3 = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2
    assert close(out.approx_kl, k3)
    assert close(losses.approx_kl(old, old, mask), 0.0)


def test_clipped_value_loss() -> None:
    values = torch.tensor([[2.0, 0.0]])
    old = torch.tensor([[1.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0]])
    loss, frac = losses.clipped_value_loss(values, old, returns, torch.ones(1, 2), clip_range=0.5)
    # token 0: v_clip = 1.5, max((2-2)^2, (1.5-2)^2) = 0.25 (clipped wins);
    # token 1: v_clip = 0,   max(1, 1) = 1 (tie: not counted as clipped).
    assert close(loss, 0.5 * (0.25 + 1.0) / 2)
    assert close(frac, 0.5)

"""PPO recipe: RLHF of a causal-LM LoRA adapter against a registered reward adapter (InstructGPT).

`adapterdock train ppo --base BASE --prompts PROMPTS --reward REWARD_REF --name NAME
 [--from ADAPTER_REF] [--kl-coef 0.05] [--adaptive-kl]`

One base model is in memory, carrying up to three LoRA adapters:
- "default": the policy being trained (a new LoRA, or the `--from` SFT adapter);
- "reference": with `--from`, a frozen second copy of that SFT adapter; without it the reference
  is the base with adapters disabled;
- "reward": the registered reward adapter's LoRA, frozen; its `score` head is a separate
  `nn.Linear` (hidden -> 1) read at each sample's last token.
The value head is a small `nn.Linear` on the policy's last hidden states (trained, not saved).

Each step: sample completions for a batch of prompts; score them; per-token rewards are the KL
penalty -kl_coef * (log pi - log ref) plus the score on the last token; GAE gives advantages and
returns; then `ppo_epochs` passes of minibatch updates with the clipped policy loss and clipped
value loss. The KL coefficient is fixed, or adaptive (Ziegler et al. 2019) with `--adaptive-kl`.
Logged per step: mean reward, KL, policy loss, value loss, clip fraction, entropy. Guards: NaN/inf,
only-empty generations and KL beyond `--max-kl` stop the run with `PPOStoppedError`, and nothing
is registered. Eval (before and after): mean reward and KL of samples on held-out prompts.
Runs in one process (generation does not fit the data-parallel loop). The result is an ordinary
CAUSAL_LM adapter registered with task "ppo". Sampling and scoring a batch (`rollout`) live in
`trainers.ppo_rollout`; the losses and GAE in `trainers.losses`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from hub.bases import resolve_base
from hub.errors import AdapterDockError
from hub.manifest import Manifest
from trainers import losses
from trainers.configs import ConfigError, TrainConfig, option
from trainers.data.preference import read_prompts
from trainers.data.records import split_off_eval
from trainers.data.tokenize import encode_prompt
from trainers.export import save_and_register, write_reward_curve
from trainers.loop import TrainResult, count_parameters, create_accelerator, peak_memory_mb
from trainers.methods import get_method
from trainers.modeling import load_model, load_tokenizer, seed_everything
from trainers.ppo_rollout import PPOModels, Rollout, content_lengths, forward, rollout
from trainers.registered_adapters import (
    REFERENCE,
    REWARD,
    attach_reward_adapter,
    load_policy_and_reference,
    registered_adapter,
)

logger = logging.getLogger(__name__)

TASK = "ppo"
START_TASKS = ("instruction", "dpo", "ppo")
SHARED_BASE_METHODS = ("lora", "qlora")

HELP = "RLHF with PPO: train a LoRA policy against a registered reward adapter (InstructGPT recipe)."
EXAMPLE = (
    "adapterdock train ppo --base tiny --prompts trainers/sample_data/prompts.jsonl "
    "--reward my-reward --name my-ppo --kl-coef 0.05 --max-steps 20"
)


class PPOStoppedError(AdapterDockError, RuntimeError):
    """PPO stopped on a failure mode (NaN/inf, only empty samples, KL blow-up); nothing registered."""

    default_remedy = (
        "Nothing was registered. Lower --lr, raise --kl-coef (or use --adaptive-kl), "
        "or check the reward adapter and prompts."
    )


@dataclass
class Config(TrainConfig):
    """PPO options (on top of the shared training options; --batch-size = prompts per rollout)."""

    data: str = option("", "Alias of --prompts.")
    prompts: str = option(
        "",
        "Prompts: JSONL with `prompt` (string or chat messages) or `messages`, or plain text "
        "with one prompt per line. --eval takes a prompts file too.",
    )
    reward: str = option("", "Registered reward adapter (NAME, NAME@VERSION or NAME@TAG).", required=True)
    from_adapter: str | None = option(
        None,
        "Start from this registered instruction (SFT) adapter, also the frozen KL reference "
        "(default: a new LoRA adapter; reference = the base).",
        flag="from",
    )
    kl_coef: float = option(0.05, "KL penalty coefficient beta (initial value with --adaptive-kl).")
    adaptive_kl: bool = option(False, "Adapt the KL coefficient towards --target-kl.")
    target_kl: float = option(6.0, "Target KL per sample (nats) for --adaptive-kl.")
    kl_horizon: int = option(10000, "Horizon (samples) of the adaptive KL controller.")
    max_kl: float = option(
        50.0, "Stop (nothing registered) when the mean KL per sample exceeds this many nats."
    )
    samples_per_prompt: int = option(
        1,
        "Completions per prompt in each rollout (--batch-size prompts x this many). Above 1, each "
        "score is centred on the mean score of the prompt's other samples (RLOO's leave-one-out "
        "baseline), which takes the prompt's own share out of the reward's variance.",
    )
    max_new_tokens: int = option(32, "Tokens sampled per completion.")
    temperature: float = option(
        1.0,
        "Sampling temperature of the rollouts; log-probs and the KL are taken at it too, so sample "
        "the trained adapter at the same temperature.",
    )
    ppo_epochs: int = option(4, "Optimisation passes over each rollout batch.")
    mini_batch_size: int = option(
        4, "Samples per PPO minibatch (at most --batch-size x --samples-per-prompt)."
    )
    clip_range: float = option(0.2, "Policy ratio clip range epsilon.")
    value_clip_range: float = option(0.2, "Value clip range around the rollout's values.")
    vf_coef: float = option(0.1, "Weight of the value loss.")
    gamma: float = option(1.0, "Discount factor.")
    lam: float = option(0.95, "GAE lambda.")

    def __post_init__(self) -> None:
        self.prompts = self.prompts or self.data
        self.data = self.prompts

    def problems(self) -> list[str]:
        found = super().problems()
        if not self.prompts:
            found.append("--prompts is required")
        if self.method not in SHARED_BASE_METHODS:
            found.append(
                f"--method {self.method} is not supported by ppo: the reference is the base with "
                "the adapter disabled, so use lora or qlora"
            )
        positive = ("kl_horizon", "max_new_tokens", "ppo_epochs", "mini_batch_size", "samples_per_prompt")
        found += [f"--{n.replace('_', '-')} must be > 0" for n in positive if getattr(self, n) <= 0]
        if self.kl_coef < 0 or not self.max_kl > 0 or not self.target_kl > 0:
            found.append("--kl-coef must be >= 0, --max-kl and --target-kl > 0")
        if not self.temperature > 0:
            found.append(f"--temperature must be > 0, got {self.temperature}")
        if self.mini_batch_size > self.batch_size * max(self.samples_per_prompt, 1):
            found.append("--mini-batch-size must not exceed --batch-size x --samples-per-prompt")
        if self.max_new_tokens >= self.max_length:
            found.append("--max-new-tokens must be below --max-length (prompt + completion)")
        if not (0 < self.clip_range and 0 < self.value_clip_range and 0 <= self.gamma <= 1):
            found.append("--clip-range and --value-clip-range must be > 0, --gamma in [0, 1]")
        if not 0 <= self.lam <= 1:
            found.append(f"--lam must be in [0, 1], got {self.lam}")
        return found


class AdaptiveKLController:
    """Ziegler et al. (2019): coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""

    def __init__(self, coef: float, target: float | None, horizon: int) -> None:
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n_samples: int) -> None:
        if self.target is None:  # fixed coefficient
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_samples / self.horizon


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def load_models(config: Config, base: Any, tokenizer: Any, device: str) -> PPOModels:
    """Load the base once and attach the policy, reference and reward adapters and the heads."""
    reward = registered_adapter(config.reward, config.registry, base, ("reward",), "--reward")
    method = get_method(config.method)
    model = load_model(base, TASK, tokenizer, **method.load_kwargs(config, device))
    if config.from_adapter:
        start = registered_adapter(config.from_adapter, config.registry, base, START_TASKS, "--from-adapter")
        policy = load_policy_and_reference(model, start.path, quantized=method.quantized)
    else:
        policy = method.prepare(model, config, TASK)
    reward_head = attach_reward_adapter(policy, reward.path)
    seed_everything(config.seed)
    value_head = torch.nn.Linear(policy.config.hidden_size, 1)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    parameter = next(p for p in policy.parameters() if p.requires_grad)
    value_head.to(parameter.device)
    reference = REFERENCE if config.from_adapter else None
    return PPOModels(policy, value_head, reward_head, reference, reward.manifest.ref)


# ---------------------------------------------------------------------------------------------
# One PPO step
# ---------------------------------------------------------------------------------------------


def check_finite(step: int, **values: torch.Tensor) -> None:
    """Raise PPOStoppedError naming the first non-finite quantity."""
    for name, value in values.items():
        if not torch.isfinite(value).all():
            raise PPOStoppedError(f"PPO stopped at step {step}: {name} became NaN or infinite.")


def ppo_step(
    models: PPOModels,
    batch: Rollout,
    optimizer: torch.optim.Optimizer,
    kl_coef: float,
    config: Config,
    step: int,
) -> dict[str, float]:
    """Advantages from one rollout, then `ppo_epochs` passes of clipped minibatch updates."""
    check_finite(step, reward_scores=batch.scores, logprobs=batch.logprobs, values=batch.values)
    scores = losses.leave_one_out_centering(batch.scores, config.samples_per_prompt)
    rewards, kl = losses.kl_penalty_rewards(batch.logprobs, batch.ref_logprobs, scores, batch.mask, kl_coef)
    advantages, returns = losses.gae(rewards, batch.values, batch.mask, config.gamma, config.lam)
    advantages = losses.masked_whiten(advantages, batch.mask)
    params = [p for p in models.policy.parameters() if p.requires_grad]
    params += list(models.value_head.parameters())
    totals: dict[str, float] = {}
    updates = 0
    for _ in range(config.ppo_epochs):
        for index in torch.randperm(len(batch.scores)).split(config.mini_batch_size):
            logits, values = forward(
                models,
                batch.sequences[index],
                batch.attention_mask[index],
                batch.prompt_width,
                config.temperature,
            )
            mask = batch.mask[index]
            logprobs = losses.gather_logprobs(logits, batch.responses[index])
            policy = losses.clipped_policy_loss(
                logprobs, batch.logprobs[index], advantages[index], mask, config.clip_range
            )
            value_loss, value_clip = losses.clipped_value_loss(
                values, batch.values[index], returns[index], mask, config.value_clip_range
            )
            loss = policy.loss + config.vf_coef * value_loss
            check_finite(step, loss=loss)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            with torch.no_grad():
                entropy = losses.masked_mean(losses.entropy_from_logits(logits), mask)
            for key, value in (
                ("loss", loss), ("policy_loss", policy.loss), ("value_loss", value_loss),
                ("clip_fraction", policy.clip_fraction), ("value_clip_fraction", value_clip),
                ("approx_kl", policy.approx_kl), ("entropy", entropy),
            ):  # fmt: skip
                totals[key] = totals.get(key, 0.0) + float(value.detach())
            updates += 1
    stats = {key: value / updates for key, value in totals.items()}
    stats["reward"] = float(batch.scores.mean())
    stats["kl"] = float(kl.sum(-1).mean())
    stats["kl_coef"] = kl_coef
    stats["non_score_reward"] = float((rewards.sum(-1) - scores).mean())
    return stats


# ---------------------------------------------------------------------------------------------
# Eval and the run
# ---------------------------------------------------------------------------------------------


def evaluate(
    models: PPOModels, prompts: list[list[int]], tokenizer: Any, config: Config
) -> tuple[dict[str, float], torch.Tensor]:
    """Mean reward, KL per sample and completion length of samples on the eval prompts.

    Each prompt gets `--samples-per-prompt` samples, drawn with a fixed seed (the global RNG is
    restored afterwards), so before and after compare alike. Also returns each prompt's mean
    score, for the paired before/after comparison (the prompt moves the score far more than the
    reply does, so only a paired difference is precise).
    """
    scores, kls, lengths = [], [], []
    per_rollout = max(config.batch_size, config.samples_per_prompt)
    expanded = [p for p in prompts for _ in range(config.samples_per_prompt)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        for start in range(0, len(expanded), per_rollout):
            batch = rollout(models, expanded[start : start + per_rollout], tokenizer, config)
            scores.append(batch.scores.float())
            kls.append(((batch.logprobs - batch.ref_logprobs) * batch.mask).sum(-1))
            lengths.append(content_lengths(batch, tokenizer.eos_token_id).float())
    all_scores = torch.cat(scores)
    metrics = {
        "mean_reward": float(all_scores.mean()),
        "kl": float(torch.cat(kls).mean()),
        "mean_length": float(torch.cat(lengths).mean()),
    }
    return metrics, all_scores.view(len(prompts), config.samples_per_prompt).mean(-1)


def paired_gain(after: torch.Tensor, before: torch.Tensor) -> dict[str, float]:
    """Mean per-prompt reward gain over the starting policy, with its 95% interval half-width."""
    diff = (after - before).double()
    sem = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return {"reward_gain": float(diff.mean()), "reward_gain_ci95": 1.96 * sem}


def train(config: Config) -> Manifest:
    """Run PPO and register the policy adapter.

    Raises:
        ConfigError, DataError, AdapterNotFoundError, BaseMismatchError: before training.
        PPOStoppedError: a failure mode during training (nothing registered).
    """
    config.validate()
    seed_everything(config.seed)
    base = resolve_base(config.base, registry=config.registry)
    records = read_prompts(config.prompts)
    if config.eval:
        train_records, eval_records = records, read_prompts(config.eval)
    else:
        train_records, eval_records = split_off_eval(records, config.eval_fraction, config.seed)
    tokenizer = load_tokenizer(base)
    prompt_room = config.max_length - config.max_new_tokens
    train_prompts = [encode_prompt(tokenizer, r.prompt, prompt_room) for r in train_records]
    eval_prompts = [encode_prompt(tokenizer, r.prompt, prompt_room) for r in eval_records]

    accelerator = create_accelerator(config)
    if accelerator.num_processes > 1:
        raise ConfigError("ppo runs in a single process.", "Run it without torchrun/accelerate launch.")
    device = str(accelerator.device)
    method = get_method(config.method)
    models = load_models(config, base, tokenizer, device)
    models.policy.eval()  # no dropout: the ratio pi/pi_old must be exactly 1 before any update
    trainable, total = count_parameters(models.policy)
    trainable += sum(p.numel() for p in models.value_head.parameters())

    steps = config.max_steps
    if steps <= 0:
        steps = max(1, math.ceil(config.epochs * len(train_prompts) / config.batch_size))
    params = [p for p in models.policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params + list(models.value_head.parameters()),
        lr=config.learning_rate,
        weight_decay=config.weight_decay,
    )
    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=int(config.warmup_ratio * steps), num_training_steps=steps
    )
    controller = AdaptiveKLController(
        config.kl_coef, config.target_kl if config.adaptive_kl else None, config.kl_horizon
    )
    baseline, baseline_prompts = (
        evaluate(models, eval_prompts, tokenizer, config) if config.baseline else ({}, None)
    )
    history: list[dict[str, Any]] = [{"step": 0, "epoch": 0.0, "eval": baseline}] if baseline else []
    order = torch.randperm(len(train_prompts), generator=torch.Generator().manual_seed(config.seed)).tolist()
    progress = tqdm(total=steps, desc=f"ppo {config.name}", unit="step", disable=not config.progress)
    started, cursor = time.perf_counter(), 0
    for step in range(1, steps + 1):
        indices = [order[(cursor + i) % len(order)] for i in range(config.batch_size)]
        cursor += config.batch_size
        prompts = [train_prompts[i] for i in indices for _ in range(config.samples_per_prompt)]
        batch = rollout(models, prompts, tokenizer, config)
        lengths = content_lengths(batch, tokenizer.eos_token_id)
        if int(lengths.max()) == 0:
            raise PPOStoppedError(f"PPO stopped at step {step}: every sampled completion was empty.")
        stats = ppo_step(models, batch, optimizer, controller.coef, config, step)
        scheduler.step()
        if stats["kl"] > config.max_kl:
            raise PPOStoppedError(
                f"PPO stopped at step {step}: KL to the reference reached {stats['kl']:.2f} nats per "
                f"sample (--max-kl {config.max_kl}); the policy is drifting, often reward hacking."
            )
        controller.update(stats["kl"], len(prompts))
        stats |= {
            "mean_length": float(lengths.float().mean()),
            "empty_share": float((lengths == 0).float().mean()),
        }
        entry = {
            "step": step,
            "epoch": round(cursor / len(order), 4),
            **stats,
            "lr": scheduler.get_last_lr()[0],
        }
        history.append(entry)
        if step % config.log_every == 0 or step == steps:
            logger.info(
                "ppo step %d: reward %.4f kl %.4f policy_loss %.4f value_loss %.4f clip %.3f entropy %.3f",
                step, stats["reward"], stats["kl"], stats["policy_loss"], stats["value_loss"],
                stats["clip_fraction"], stats["entropy"],
            )  # fmt: skip
        progress.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.3f}")
        progress.update(1)
        if config.eval_every and step % config.eval_every == 0 and step < steps:
            history.append(
                {
                    "step": step,
                    "epoch": entry["epoch"],
                    "eval": evaluate(models, eval_prompts, tokenizer, config)[0],
                }
            )
    progress.close()
    seconds = time.perf_counter() - started
    metrics, after_prompts = evaluate(models, eval_prompts, tokenizer, config)
    if not math.isfinite(metrics["mean_reward"]) or metrics["kl"] > config.max_kl:
        raise PPOStoppedError(
            f"PPO finished with eval KL {metrics['kl']:.2f} / reward {metrics['mean_reward']}."
        )
    history.append({"step": steps, "epoch": round(cursor / len(order), 4), "eval": metrics})
    if baseline_prompts is not None:
        metrics |= paired_gain(after_prompts, baseline_prompts)
        logger.info(
            "ppo eval mean reward %.4f (before %.4f; paired gain %.4f +- %.4f), kl %.4f",
            metrics["mean_reward"], baseline["mean_reward"], metrics["reward_gain"],
            metrics["reward_gain_ci95"], metrics["kl"],
        )  # fmt: skip
    else:
        logger.info("ppo eval mean reward %.4f, kl %.4f", metrics["mean_reward"], metrics["kl"])
    result = TrainResult(
        model=models.policy,
        metrics=metrics,
        baseline=baseline,
        history=history,
        steps=steps,
        epochs=round(cursor / len(order), 4),
        train_seconds=round(seconds, 3),
        peak_memory_mb=round(peak_memory_mb(accelerator.device), 1),
        trainable_params=trainable,
        total_params=total,
    )
    for name in (REWARD, REFERENCE):
        if name in models.policy.peft_config:
            models.policy.delete_adapter(name)  # save only the policy adapter
    data = {
        "prompts": config.prompts,
        "eval": config.eval or f"{config.eval_fraction:g} of prompts (seed {config.seed})",
        "train_prompts": len(train_prompts),
        "eval_prompts": len(eval_prompts),
        "reward": models.reward_ref,
        **({"from": config.from_adapter} if config.from_adapter else {}),
    }
    return save_and_register(
        models.policy, tokenizer=tokenizer, config=config, task=TASK, method=method, device=device,
        base=base, labels=[], result=result, data=data,
        write_extra=lambda out_dir: write_reward_curve(out_dir, history),
    )  # fmt: skip

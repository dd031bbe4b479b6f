"""The shared training loop: `accelerate.Accelerator`, gradient accumulation, eval, progress, history.

Boundary: a prepared (adapted) model, tokenized examples and callbacks in; a `TrainResult` out.
The loop knows nothing about tasks: a recipe passes `eval_step` (one batch -> per-example outputs)
and `compute_metrics` (all outputs -> metric dict); eval outputs are gathered from every process,
so metrics cover the full eval set under `torchrun`. A custom `loss_fn(model, batch)` (returning a
loss, or `(loss, logs)`) lets other recipes (DPO, reward) reuse the loop. Under `torchrun` or
`accelerate launch` it runs data-parallel unchanged; only the main process shows progress.

Typical use::

    accelerator = create_accelerator(config)
    result = run_training(model, train, eval, collate, config, accelerator,
                          eval_step=..., compute_metrics=...)
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from hub.errors import AdapterDockError
from hub.machine import cpu_has_fast_bf16
from trainers.configs import ConfigError, TrainConfig
from trainers.methods import get_method

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]
EvalStep = Callable[[torch.nn.Module, Batch], list[Any]]
ComputeMetrics = Callable[[list[Any]], dict[str, float]]


class TrainingDivergedError(AdapterDockError, FloatingPointError):
    """The training loss became NaN or infinite; nothing is registered."""

    default_remedy = "Lower --lr (or raise --warmup-ratio) and run again."


@dataclass
class TrainResult:
    """What a run produced: the unwrapped model, final and baseline metrics, and the history."""

    model: torch.nn.Module
    metrics: dict[str, float]
    baseline: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    epochs: float = 0.0
    train_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    trainable_params: int = 0
    total_params: int = 0
    num_processes: int = 1
    precision: str = "fp32"
    """`bf16` when the run computed under bf16 autocast, else `fp32`."""


def resolve_precision(config: TrainConfig, cpu: bool) -> str:
    """`bf16` (autocast) or `fp32`: what `--precision auto|bf16|fp32` means on this device."""
    if config.precision != "auto":
        return config.precision
    fast = cpu_has_fast_bf16() if cpu else torch.cuda.is_bf16_supported()
    return "bf16" if fast else "fp32"


def create_accelerator(config: TrainConfig) -> Accelerator:
    """An Accelerator on GPU or CPU with bf16 autocast where it pays (`resolve_precision`); picks up
    torchrun's processes."""
    cpu = config.cpu or not torch.cuda.is_available()
    precision = resolve_precision(config, cpu)
    logger.info("training on %s with %s compute", "cpu" if cpu else "cuda", precision)
    mixed_precision = "bf16" if precision == "bf16" else "no"
    _allow_precision(mixed_precision)
    return Accelerator(
        cpu=cpu, mixed_precision=mixed_precision, gradient_accumulation_steps=config.grad_accum
    )


def _allow_precision(mixed_precision: str) -> None:
    """Let a later run in the same process (a notebook, a sweep, a test session) use another precision.

    accelerate keeps one `AcceleratorState` per process and refuses an Accelerator whose mixed precision
    differs from the first one's; its per-run part is reset here, never the distributed part
    (`PartialState`: torchrun's process group), which is the same for every run of a process.
    """
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def default_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """The model's own loss (`labels` in the batch; -100 positions ignored)."""
    return model(**batch).loss


def build_optimizer(
    model: torch.nn.Module, config: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """The method's optimizer (`Method.optimizer`) over the trainable parameters.

    Raises:
        ConfigError: nothing in the model trains.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters", "Check --method and --target-modules.")
    return get_method(config.method).optimizer(params, config, device)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count as their unpacked size."""
    trainable = total = 0
    for parameter in model.parameters():
        count = parameter.numel()
        if parameter.__class__.__name__ == "Params4bit":
            count *= 2
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total


def make_loader(
    examples: Sequence[dict[str, Any]], batch_size: int, collate: Callable, shuffle: bool, seed: int
) -> DataLoader:
    """A DataLoader over tokenized examples; shuffling uses its own seeded generator."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        list(examples), batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator
    )


def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    accelerator: Accelerator,
    eval_step: EvalStep,
    compute_metrics: ComputeMetrics,
) -> dict[str, float]:
    """Run `eval_step` over the (prepared) loader, gather outputs from all processes, score them.

    Returns:
        `compute_metrics(outputs)` plus `eval_examples` (how many examples were scored; under
        several processes, the duplicates that pad the last batch are dropped).
    """
    was_training = model.training
    model.eval()
    outputs: list[Any] = []
    with torch.no_grad():
        for batch in loader:
            outputs.extend(accelerator.gather_for_metrics(eval_step(model, batch), use_gather_object=True))
    model.train(was_training)
    return {**compute_metrics(outputs), "eval_examples": len(outputs)}


def total_optimizer_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    """--max-steps, or ceil(epochs x optimizer steps per epoch)."""
    if config.max_steps > 0:
        return config.max_steps
    per_epoch = max(1, math.ceil(batches_per_epoch / config.grad_accum))
    return max(1, math.ceil(config.epochs * per_epoch))


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def run_training(
    model: torch.nn.Module,
    train_examples: Sequence[dict[str, Any]],
    eval_examples: Sequence[dict[str, Any]],
    collate: Callable,
    config: TrainConfig,
    accelerator: Accelerator,
    *,
    eval_step: EvalStep,
    compute_metrics: ComputeMetrics,
    loss_fn: LossFn = default_loss,
) -> TrainResult:
    """Train `model` on `train_examples`, evaluating before (baseline), every N steps and at the end.

    Returns:
        TrainResult with the unwrapped model (call on every process; register on the main one).
    """
    trainable, total = count_parameters(model)
    train_loader = make_loader(train_examples, config.batch_size, collate, True, config.seed)
    eval_loader = make_loader(
        eval_examples, config.eval_batch_size or config.batch_size, collate, False, config.seed
    )
    optimizer = build_optimizer(model, config, accelerator.device)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(
        model, optimizer, train_loader, eval_loader
    )
    steps = total_optimizer_steps(config, len(train_loader))
    scheduler = get_scheduler(
        "linear", optimizer, num_warmup_steps=int(config.warmup_ratio * steps), num_training_steps=steps
    )
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)

    def run_eval() -> dict[str, float]:
        return evaluate(model, eval_loader, accelerator, eval_step, compute_metrics)

    baseline = run_eval() if config.baseline else {}
    history: list[dict[str, Any]] = []
    if baseline:
        history.append({"step": 0, "epoch": 0.0, "eval": baseline})
    logger.info(
        "training %d steps (%d trainable of %d parameters, %d process(es))",
        steps, trainable, total, accelerator.num_processes,
    )  # fmt: skip
    progress = tqdm(
        total=steps, desc=f"train {config.name}", unit="step", dynamic_ncols=True,
        disable=not (config.progress and accelerator.is_main_process),
    )  # fmt: skip
    log_every = min(config.log_every, max(1, steps // 10))  # at least ~10 points on the curve
    started, step, micro, window = time.perf_counter(), 0, 0, 0
    running, running_logs = 0.0, {}
    model.train()
    while step < steps:
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss, logs = _split_loss(loss_fn(model, batch))
                if not torch.isfinite(loss):
                    raise TrainingDivergedError(f"training loss became {loss.item()} at step {step}.")
                accelerator.backward(loss)
                running += loss.detach().float().item() / config.grad_accum
                for key, value in logs.items():
                    running_logs[key] = running_logs.get(key, 0.0) + value / config.grad_accum
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()
            micro += 1
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step, window = step + 1, window + 1
            epoch = micro / len(train_loader)
            if step % log_every == 0 or step == steps:
                mean = accelerator.reduce(torch.tensor(running, device=accelerator.device), "mean")
                entry = {"step": step, "epoch": round(epoch, 4), "loss": mean.item() / window}
                entry["lr"] = scheduler.get_last_lr()[0]
                entry |= {key: value / window for key, value in running_logs.items()}
                history.append(entry)
                progress.set_postfix(loss=f"{entry['loss']:.4f}")
                running, running_logs, window = 0.0, {}, 0
            progress.update(1)
            if config.eval_every and step % config.eval_every == 0 and step < steps:
                history.append({"step": step, "epoch": round(epoch, 4), "eval": run_eval()})
            if step >= steps:
                break
    progress.close()
    seconds = time.perf_counter() - started
    metrics = run_eval()
    history.append({"step": step, "epoch": round(micro / len(train_loader), 4), "eval": metrics})
    accelerator.wait_for_everyone()
    return TrainResult(
        model=accelerator.unwrap_model(model, keep_fp32_wrapper=False),  # no autocast left on the result
        metrics=metrics,
        baseline=baseline,
        history=history,
        steps=step,
        epochs=round(micro / len(train_loader), 4),
        train_seconds=round(seconds, 3),
        peak_memory_mb=round(peak_memory_mb(accelerator.device), 1),
        trainable_params=trainable,
        total_params=total,
        num_processes=accelerator.num_processes,
        precision="bf16" if accelerator.mixed_precision == "bf16" else "fp32",
    )


def _split_loss(value: Any) -> tuple[torch.Tensor, dict[str, float]]:
    if isinstance(value, tuple):
        loss, logs = value
        return loss, {key: float(v) for key, v in logs.items()}
    return value, {}

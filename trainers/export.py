"""Export a finished run and register it: metrics.json, loss_curve.png, README.md, then the registry.

PPO adds `reward_curve.png` (`write_reward_curve`, passed as `save_and_register`'s `write_extra`).

Boundary: a trained model and a `TrainResult` in, a `hub.manifest.Manifest` out. The `Method`
writes the weights and says what the manifest records about it (kind, format, quantization); this
module writes the run's history, loss curve and model card beside them, then calls
`hub.store.LocalStore.put` -- the only way results reach the registry. Only the main process
registers; any error before `put` leaves the registry untouched (put itself is atomic).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from hub.bases import BaseInfo
from hub.manifest import Manifest
from hub.store import LocalStore
from trainers.configs import TrainConfig
from trainers.loop import TrainResult
from trainers.methods import Method
from trainers.modeling import AUTO_CLASSES

logger = logging.getLogger(__name__)


def manifest_metrics(result: TrainResult) -> dict[str, Any]:
    """The flat metric dict a manifest records: eval metrics, `baseline_*`, size and cost figures."""
    metrics: dict[str, Any] = dict(result.metrics)
    metrics |= {f"baseline_{key}": value for key, value in result.baseline.items()}
    metrics |= {
        "train_steps": result.steps,
        "epochs": result.epochs,
        "train_seconds": result.train_seconds,
        "peak_memory_mb": result.peak_memory_mb,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
    }
    return metrics


def write_history(out_dir: Path, result: TrainResult, extra: dict[str, Any] | None = None) -> None:
    """`metrics.json`: final and baseline metrics, run figures and the full step history."""
    payload = {"final": result.metrics, "baseline": result.baseline, **(extra or {})}
    payload |= {"summary": manifest_metrics(result), "history": result.history}
    (out_dir / "metrics.json").write_text(json.dumps(payload, indent=2) + "\n")


def write_loss_curve(out_dir: Path, history: Sequence[dict[str, Any]], title: str) -> None:
    """`loss_curve.png`: training loss per logged step, eval loss too when recorded (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4), dpi=100)
    train = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    if train:
        axis.plot(*zip(*train, strict=True), label="train loss", marker="." if len(train) < 30 else None)
    evals = [(e["step"], e["eval"]["loss"]) for e in history if "loss" in e.get("eval", {})]
    if evals:
        axis.plot(*zip(*evals, strict=True), label="eval loss", marker="o")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out_dir / "loss_curve.png")
    plt.close(figure)


def write_reward_curve(out_dir: Path, history: Sequence[dict[str, Any]]) -> None:
    """`reward_curve.png`: mean reward and KL per PPO step (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in history if "reward" in e]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), dpi=100, sharex=True)
    top.plot(steps, [e["reward"] for e in history if "reward" in e], label="mean reward")
    bottom.plot(steps, [e["kl"] for e in history if "reward" in e], color="tab:red", label="KL")
    top.set_ylabel("reward")
    bottom.set_ylabel("KL (nats)")
    bottom.set_xlabel("PPO step")
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out_dir / "reward_curve.png")
    plt.close(figure)


def usage_snippet(task: str, method: Method, base: BaseInfo, labels: Sequence[str]) -> str:
    """How to load the result with plain transformers/PEFT (or adapterdock for bottleneck)."""
    auto = AUTO_CLASSES[task].__name__
    head = f", num_labels={len(labels)}" if auto != "AutoModelForCausalLM" else ""
    if method.adapter_format == "hf-model":
        return (
            "# ADAPTER_FOLDER: this folder (<registry>/NAME/VERSION)\n"
            f'from transformers import {auto}\nmodel = {auto}.from_pretrained("ADAPTER_FOLDER")'
        )
    if method.adapter_format == "bottleneck":
        return (
            "# ADAPTER_FOLDER: this folder (<registry>/NAME/VERSION)\n"
            f"from transformers import {auto}\n"
            "from trainers.methods.bottleneck import load_bottleneck\n"
            f'model = {auto}.from_pretrained("{base.path}"{head})\n'
            'model = load_bottleneck(model, "ADAPTER_FOLDER")'
        )
    return (
        "# ADAPTER_FOLDER: this folder (<registry>/NAME/VERSION)\n"
        f"from peft import PeftModel\nfrom transformers import {auto}\n"
        f'base = {auto}.from_pretrained("{base.path}"{head})\n'
        'model = PeftModel.from_pretrained(base, "ADAPTER_FOLDER")'
    )


def model_card(
    *,
    config: TrainConfig,
    task: str,
    method: Method,
    base: BaseInfo,
    labels: Sequence[str],
    result: TrainResult,
    data: dict[str, Any],
) -> str:
    """README.md for the folder: task, method, base, data, metrics vs baseline, usage."""
    rows = [
        f"| {key} | {_fmt(value)} | {_fmt(result.baseline.get(key))} |"
        for key, value in result.metrics.items()
    ]
    label_line = f"- Labels ({len(labels)}): {', '.join(labels)}\n" if labels else ""
    data_lines = "".join(f"- {key}: {value}\n" for key, value in data.items())
    return (
        f"# {config.name}\n\n{config.description or f'A {task} adapter trained with adapterdock.'}\n\n"
        f"- Task: {task}\n- Method: {config.method} ({method.kind}, "
        f"format {method.adapter_format})\n"
        f"- Base: {base.name_or_path} ({base.fingerprint})\n{label_line}"
        f"- Trainable parameters: {result.trainable_params:,} of {result.total_params:,}\n"
        f"- Steps: {result.steps} ({result.epochs} epochs), {result.train_seconds:.1f} s, "
        f"{result.num_processes} process(es)\n\n"
        f"## Data\n\n{data_lines}\n"
        "## Metrics (eval set)\n\n| metric | trained | baseline (before training) |\n|---|---|---|\n"
        + "\n".join(rows)
        + "\n\n![loss curve](loss_curve.png)\n\n## Usage\n\n```python\n"
        + usage_snippet(task, method, base, labels)
        + "\n```\n\nWith adapterdock: `adapterdock serve --base "
        + f"{base.name_or_path}` and request model `{config.name}`.\n"
    )


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def save_and_register(
    model: Any,
    *,
    tokenizer: Any,
    config: TrainConfig,
    task: str,
    method: Method,
    device: str,
    base: BaseInfo,
    labels: Sequence[str],
    result: TrainResult,
    data: dict[str, Any],
    extra_history: dict[str, Any] | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Manifest:
    """Save the weights, write history/curve/card, and `put` the folder into the registry.

    Call on the main process only.

    Args:
        model: the trained (unwrapped) model; `method.save` writes it.
        device: where it trained; the method's quantization record depends on it.
        data: what the data was (paths, sizes), for the card and the manifest's `trainer` field
            (the resolved config goes there too).
        extra_history: more keys for `metrics.json`.
        write_extra: writes a recipe's own files into the folder (e.g. PPO's reward curve).
    """
    with ExitStack() as stack:
        if config.output_dir:
            out_dir = Path(config.output_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
        else:
            out_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="adapterdock-")))
        method.save(model, out_dir, tokenizer)
        if write_extra is not None:
            write_extra(out_dir)
        write_history(out_dir, result, extra_history)
        write_loss_curve(out_dir, result.history, f"{config.name}: {task} / {config.method}")
        card = model_card(
            config=config, task=task, method=method, base=base, labels=labels,
            result=result, data=data,
        )  # fmt: skip
        (out_dir / "README.md").write_text(card)
        manifest = LocalStore(config.registry).put(
            out_dir,
            name=config.name,
            task=task,
            method=config.method,
            base=base.spec,
            labels=list(labels),
            metrics=manifest_metrics(result),
            trainer={**config.to_dict(), "data": data, "compute_precision": result.precision},
            kind=method.kind,
            adapter_format=method.adapter_format,
            quantization=method.quantization(config, device),
            description=config.description,
            tags=config.tags,
        )
    logger.info("registered %s", manifest.ref)
    return manifest

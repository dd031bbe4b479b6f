"""The shared loop on a toy model: step counting with accumulation, history, custom losses, NaNs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainers.configs import ConfigError, TrainConfig
from trainers.loop import TrainingDivergedError, build_optimizer, create_accelerator, run_training


def examples(count: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(count, 4, generator=generator)
    return [{"x": row.tolist(), "labels": int(row[0] > 0)} for row in features]


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "x": torch.tensor([r["x"] for r in rows]),
        "labels": torch.tensor([r["labels"] for r in rows]),
    }


def loss_with_logs(model, batch):
    loss = F.cross_entropy(model(batch["x"]), batch["labels"])
    return loss, {"batch_size": float(len(batch["labels"]))}


def eval_step(model, batch):
    return list(zip(model(batch["x"]).argmax(-1).tolist(), batch["labels"].tolist(), strict=True))


def accuracy(outputs):
    return {"accuracy": sum(p == r for p, r in outputs) / len(outputs)}


def config(**overrides) -> TrainConfig:
    values = {"data": "x", "name": "toy", "batch_size": 4, "lr": 0.1, "progress": False, "cpu": True}
    return TrainConfig(**(values | overrides))


def test_accumulation_steps_history_and_learning() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    cfg = config(epochs=6, grad_accum=2, log_every=2, eval_every=4)
    result = run_training(
        model, examples(32), examples(10), collate, cfg, create_accelerator(cfg),
        eval_step=eval_step, compute_metrics=accuracy, loss_fn=loss_with_logs,
    )  # fmt: skip
    assert result.steps == 24 and result.epochs == 6.0  # 8 batches / 2 per step x 6 epochs
    logged = [e for e in result.history if "loss" in e]
    assert [e["step"] for e in logged] == list(range(2, 25, 2))
    assert all(e["batch_size"] == 4.0 for e in logged)
    assert [e["step"] for e in result.history if "eval" in e] == [0, 4, 8, 12, 16, 20, 24]
    assert result.metrics["eval_examples"] == 10 and result.baseline["eval_examples"] == 10
    assert result.metrics["accuracy"] > result.baseline["accuracy"]
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert result.trainable_params == result.total_params == 10


def test_non_finite_loss_stops_the_run() -> None:
    model = torch.nn.Linear(4, 2)
    cfg = config(max_steps=3, baseline=False)

    def nan_loss(model, batch):
        return model(batch["x"]).sum() * float("nan")

    with pytest.raises(TrainingDivergedError, match="loss became nan at step 0"):
        run_training(
            model, examples(8), examples(4), collate, cfg, create_accelerator(cfg),
            eval_step=eval_step, compute_metrics=accuracy, loss_fn=nan_loss,
        )  # fmt: skip


def test_optimizer_comes_from_the_method_and_needs_trainable_weights() -> None:
    model = torch.nn.Linear(4, 2)
    assert type(build_optimizer(model, config(), torch.device("cpu"))) is torch.optim.AdamW
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer(model, config(), torch.device("cpu"))


def test_runs_of_another_precision_in_the_same_process() -> None:
    """accelerate keeps one state per process and refused a second Accelerator of another mixed precision
    (a bf16 run, then an fp32 one: a notebook, a sweep, this test session); each run gets its own."""
    first = create_accelerator(config(precision="bf16"))
    assert first.mixed_precision == "bf16"
    second = create_accelerator(config(precision="fp32"))
    assert second.mixed_precision == "no"
    assert create_accelerator(config(precision="bf16")).mixed_precision == "bf16"

"""The training configuration: one dataclass per recipe, the dataclass IS the config.

`TrainConfig` holds what every recipe shares; each recipe's `Config` subclasses it and adds its own
fields. A field's `metadata["help"]` becomes its command-line help (`trainers.cli` builds the flags
from the fields), the same keys are accepted in a YAML file, and `to_dict()` (the resolved config)
is saved in the manifest's `trainer` field. `validate()` collects every problem into one
`ConfigError`. Nothing here loads models or data.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from hub.bottleneck_format import BOTTLENECK_ACTIVATIONS, BOTTLENECK_VARIANTS
from hub.errors import AdapterDockError
from hub.manifest import METHODS
from hub.ref import validate_name

PRECISIONS = ("auto", "bf16", "fp32")

ALL_LINEAR = "all-linear"
"""`--target-modules all-linear`: every linear layer of the decoder blocks, by the model's own names
(`trainers.modeling.block_linear_names`: Llama's q/k/v/o/gate/up/down, Phi-3's fused qkv/gate_up)."""
DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "dora": 2e-4, "qdora": 2e-4, "bottleneck": 1e-3, "full": 5e-5}


class ConfigError(AdapterDockError, ValueError):
    """A training configuration with invalid or missing values (every problem listed)."""

    default_remedy = "Fix the listed options (see `adapterdock train TASK --help`)."


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field whose `help` becomes the CLI flag's help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Options shared by every training recipe."""

    base: str = option(
        "tiny",
        "Base model: built-in name (smollm2-135m, tiny, small), local HF folder, registry:NAME or HF id.",
    )
    data: str = option("", "Training data file.", required=True)
    eval: str | None = option(None, "Evaluation data file (default: split --eval-fraction off --data).")
    name: str = option(
        "",
        "Registry name for the result (e.g. my-classifier or team/my-classifier).",
        required=True,
    )
    method: str = option(
        "lora",
        "Adaptation method (dora: LoRA with a learned magnitude per output feature; qdora: DoRA on the "
        "4-bit NF4 base as qlora loads it).",
        choices=METHODS,
    )
    rank: int = option(8, "LoRA rank r (lora, qlora, dora, qdora).")
    alpha: float = option(
        16.0, "LoRA alpha; the update is scaled by alpha / rank (lora, qlora, dora, qdora)."
    )
    dropout: float = option(0.05, "Dropout on the adapter's input (lora, qlora, dora, qdora, bottleneck).")
    target_modules: list[str] = option(
        [ALL_LINEAR],
        "Modules to adapt: names like q_proj v_proj, or all-linear (every linear layer of the blocks).",
    )
    epochs: float = option(1.0, "Passes over the training data (ignored when --max-steps > 0).")
    max_steps: int = option(-1, "Optimizer steps to run; overrides --epochs when > 0.")
    lr: float | None = option(
        None,
        "Peak learning rate (default per method: lora/qlora/dora/qdora 2e-4, bottleneck 1e-3, full 5e-5).",
    )
    weight_decay: float = option(0.0, "AdamW weight decay.")
    warmup_ratio: float = option(0.05, "Share of steps spent warming the learning rate up linearly.")
    batch_size: int = option(8, "Examples per device per forward pass.")
    eval_batch_size: int | None = option(None, "Examples per device per eval pass (default: --batch-size).")
    grad_accum: int = option(1, "Forward passes per optimizer step (gradient accumulation).")
    max_length: int = option(256, "Tokens per example; longer examples are truncated.")
    seed: int = option(42, "Random seed for weights, adapter init, shuffling and the eval split.")
    eval_fraction: float = option(0.1, "Share of --data held out for eval when --eval is not given.")
    eval_every: int = option(0, "Evaluate every N optimizer steps (0: only at the end).")
    baseline: bool = option(True, "Also evaluate before training (the untrained/majority baseline).")
    log_every: int = option(
        10, "Record the training loss every N optimizer steps (more often in short runs)."
    )
    reduction_factor: int = option(16, "Bottleneck size = hidden size / reduction factor (bottleneck).")
    bottleneck_variant: str = option(
        "pfeiffer", "Where bottleneck adapters go (bottleneck).", choices=BOTTLENECK_VARIANTS
    )
    non_linearity: str = option("relu", "Bottleneck activation (bottleneck).", choices=BOTTLENECK_ACTIVATIONS)
    registry: str | None = option(None, "Registry folder (default: $ADAPTERDOCK_REGISTRY or ./adapters).")
    output_dir: str | None = option(None, "Keep the exported folder here too (default: a temporary folder).")
    description: str = option("", "Free text for the manifest and model card.")
    tags: list[str] = option([], "Tags to point at the new version (e.g. latest-good).")
    progress: bool = option(True, "Show a progress bar on the main process.")
    cpu: bool = option(False, "Train on the CPU even when a GPU is available.")
    precision: str = option(
        "auto",
        "Compute precision: auto = bf16 autocast on GPUs and on CPUs with avx512_bf16 or AMX, else fp32; "
        "bf16 forces autocast; fp32 turns it off. Weights stay fp32; the manifest records the choice.",
        choices=PRECISIONS,
    )

    # ---- derived values ----------------------------------------------------------------------
    @property
    def learning_rate(self) -> float:
        """--lr, or the method's default."""
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.method, 2e-4)

    def wants_all_linear(self) -> bool:
        """Whether every block linear is adapted (`all-linear`, or no list): expanded against the model."""
        return not self.target_modules or self.target_modules == [ALL_LINEAR]

    def resolved_target_modules(self) -> list[str]:
        """Module names to adapt as asked: `[all-linear]` (the model names them) or the given names."""
        return [ALL_LINEAR] if self.wants_all_linear() else list(self.target_modules)

    # ---- validation --------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every problem with the values; recipes extend this with their own checks."""
        found = []
        for item in dataclasses.fields(self):
            if item.metadata.get("required") and not getattr(self, item.name):
                found.append(f"--{flag(item.name)} is required")
            choices = item.metadata.get("choices")
            if choices and getattr(self, item.name) not in choices:
                value = getattr(self, item.name)
                found.append(f"--{flag(item.name)} must be one of {', '.join(choices)}, got {value!r}")
        if self.name:
            try:
                validate_name(self.name)
            except ValueError as err:
                found.append(f"--name {self.name!r}: {err}")
        positive = [
            "rank",
            "batch_size",
            "grad_accum",
            "max_length",
            "reduction_factor",
            "log_every",
        ]
        found += [
            f"--{flag(n)} must be > 0, got {getattr(self, n)}" for n in positive if getattr(self, n) <= 0
        ]
        if self.eval_batch_size is not None and self.eval_batch_size <= 0:
            found.append("--eval-batch-size must be > 0")
        if self.alpha <= 0:
            found.append(f"--alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            found.append(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.max_steps <= 0 and not (self.epochs > 0 and math.isfinite(self.epochs)):
            found.append("set --epochs > 0 or --max-steps > 0")
        if self.lr is not None and not self.lr > 0:
            found.append(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            found.append(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.eval is None and not 0 < self.eval_fraction < 1:
            found.append(f"--eval-fraction must be in (0, 1) without --eval, got {self.eval_fraction}")
        if self.eval_every < 0:
            found.append("--eval-every must be >= 0")
        return found

    def validate(self) -> None:
        """Raise one ConfigError listing every problem, if any."""
        found = self.problems()
        if found:
            raise ConfigError(f"{len(found)} invalid option(s):\n  " + "\n  ".join(found) + "\n")

    def to_dict(self) -> dict[str, Any]:
        """The resolved config (defaults filled in) as saved in the manifest's `trainer` field."""
        data = dataclasses.asdict(self)
        data["lr"] = self.learning_rate
        data["target_modules"] = self.resolved_target_modules()
        data["eval_batch_size"] = self.eval_batch_size or self.batch_size
        return data

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a mapping (YAML keys; `-` and `_` both accepted); unknown keys are errors."""
        names = {item.name for item in dataclasses.fields(cls)}
        normalised = {key.replace("-", "_"): value for key, value in values.items()}
        unknown = sorted(set(normalised) - names)
        if unknown:
            raise ConfigError(
                f"unknown option(s): {', '.join(unknown)}",
                f"Known options: {', '.join(sorted(names))}.",
            )
        return cls(**normalised)


def flag(name: str) -> str:
    """The command-line spelling of a field name: `max_steps` -> `max-steps`."""
    return name.replace("_", "-")

"""Bottleneck adapters (Houlsby, Pfeiffer), written here: add, train, save and load them.

The torch side of the bottleneck format (see docs/training.md): `add_bottleneck_adapters`,
`save_bottleneck`, `load_bottleneck`. Each adapter is a residual `h + up(act(down(h)))` applied by a
forward hook to the output of a block's attention `o_proj` (Houlsby only) and MLP `down_proj`
(both variants), before the residual add. `up` starts at zero, so a fresh adapter is the identity.
Folder: `bottleneck_config.json` + `adapter_model.safetensors` with tensors
`layers.{i}.attn_adapter.{down,up}.{weight,bias}`, `layers.{i}.mlp_adapter.{down,up}.{weight,bias}`
and, for task heads, `score.weight`. The format's rules (file names, the `bottleneck_config.json`
schema, variants, activations) are `hub.adapter_format`'s and `hub.bottleneck_format`'s. Boundary:
torch, safetensors, hub and the `trainers.methods.Method` interface (no PEFT); the server reads these
folders with its own code (`server.adapter_weights`), not this module.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hub.adapter_format import BOTTLENECK_CONFIG as CONFIG_NAME
from hub.adapter_format import WEIGHTS_FILE as WEIGHTS_NAME
from hub.bottleneck_format import BottleneckConfig
from hub.errors import CorruptAdapterError
from trainers.methods import Method

if TYPE_CHECKING:
    from trainers.configs import TrainConfig

logger = logging.getLogger(__name__)

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
"""`hub.bottleneck_format.BOTTLENECK_ACTIVATIONS` as torch modules."""
HEAD_NAMES = ("score.weight", "score.bias")


class Bottleneck(nn.Module):
    """`h + up(act(down(dropout(h))))`; `up` is zero-initialised so it starts as the identity."""

    def __init__(self, hidden_size: int, size: int, non_linearity: str, dropout: float = 0.0):
        super().__init__()
        self.down = nn.Linear(hidden_size, size)
        self.act = ACTIVATIONS[non_linearity]()
        self.up = nn.Linear(size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.down.weight, std=hidden_size**-0.5)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        delta = self.up(self.act(self.down(self.dropout(hidden).to(self.down.weight.dtype))))
        return hidden + delta.to(hidden.dtype)


class BottleneckLayer(nn.Module):
    """The adapters of one decoder block (`attn_adapter` is None for Pfeiffer)."""

    def __init__(self, config: BottleneckConfig, dropout: float = 0.0):
        super().__init__()

        def make() -> Bottleneck:
            return Bottleneck(config.hidden_size, config.bottleneck_size, config.non_linearity, dropout)

        self.attn_adapter = make() if config.variant == "houlsby" else None
        self.mlp_adapter = make()


class BottleneckAdapters(nn.Module):
    """All blocks' adapters; its state_dict keys are the file's tensor names."""

    def __init__(self, config: BottleneckConfig, dropout: float = 0.0):
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(BottleneckLayer(config, dropout) for _ in range(config.num_layers))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama-style model (blocks with `self_attn.o_proj`, `mlp.down_proj`)."""
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            block = module[0]
            if hasattr(block, "self_attn") and hasattr(getattr(block, "mlp", None), "down_proj"):
                return module
    raise CorruptAdapterError(
        f"{type(model).__name__} has no Llama-style decoder blocks (self_attn.o_proj, mlp.down_proj).",
        "Bottleneck adapters support Llama-style bases (the built-in bases, Llama, Mistral, Qwen2).",
    )


def make_config(
    model: nn.Module,
    *,
    variant: str = "pfeiffer",
    reduction_factor: int = 16,
    non_linearity: str = "relu",
    task_type: str = "CAUSAL_LM",
    num_labels: int | None = None,
) -> BottleneckConfig:
    """A BottleneckConfig sized for `model` (bottleneck size = hidden size // reduction factor)."""
    hidden_size = model.config.hidden_size
    return BottleneckConfig(
        variant=variant,
        reduction_factor=reduction_factor,
        bottleneck_size=max(1, hidden_size // reduction_factor),
        non_linearity=non_linearity,
        hidden_size=hidden_size,
        num_layers=len(decoder_layers(model)),
        task_type=task_type,
        num_labels=num_labels,
    )


def add_bottleneck_adapters(
    model: nn.Module, cfg: BottleneckConfig, dropout: float = 0.0
) -> BottleneckAdapters:
    """Attach adapters to `model` (as `model.bottleneck_adapters`) and hook them into every block.

    Returns:
        The adapters module (its parameters are the trainable ones; the caller freezes the base).
    """
    layers = decoder_layers(model)
    if cfg.num_layers != len(layers) or cfg.hidden_size != model.config.hidden_size:
        raise CorruptAdapterError(
            f"bottleneck adapter for {cfg.num_layers} layers x {cfg.hidden_size} hidden does not fit "
            f"a base with {len(layers)} layers x {model.config.hidden_size} hidden.",
            "Load it onto the base it was trained on (see its manifest).",
        )
    if hasattr(model, "bottleneck_adapters"):
        raise CorruptAdapterError("model already has bottleneck adapters", "Load onto a fresh base.")
    reference = next(model.parameters())
    adapters = BottleneckAdapters(cfg, dropout).to(reference.device)
    model.bottleneck_adapters = adapters
    for block, layer in zip(layers, adapters.layers, strict=True):
        if layer.attn_adapter is not None:
            block.self_attn.o_proj.register_forward_hook(_hook(layer.attn_adapter))
        block.mlp.down_proj.register_forward_hook(_hook(layer.mlp_adapter))
    return adapters


def _hook(adapter: Bottleneck):
    def apply(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        return adapter(output)

    return apply


def save_bottleneck(model: nn.Module, out_dir: str | Path) -> None:
    """Write `bottleneck_config.json` and `adapter_model.safetensors` (adapters + task head)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapters: BottleneckAdapters = model.bottleneck_adapters
    tensors = {name: t.detach().cpu().contiguous() for name, t in adapters.state_dict().items()}
    head = getattr(model, "score", None)
    if isinstance(head, nn.Linear):
        tensors["score.weight"] = head.weight.detach().cpu().contiguous()
        if head.bias is not None:
            tensors["score.bias"] = head.bias.detach().cpu().contiguous()
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(asdict(adapters.config), indent=2) + "\n")


def load_bottleneck(model: nn.Module, folder: str | Path) -> nn.Module:
    """Attach the adapters saved in `folder` to `model` (and load its task head); returns `model`.

    Raises:
        CorruptAdapterError: missing/malformed files, or a shape that does not fit the model.
    """
    folder = Path(folder)
    try:
        cfg = BottleneckConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
        tensors = load_file(str(folder / WEIGHTS_NAME))
    except (OSError, json.JSONDecodeError) as err:
        raise CorruptAdapterError(f"{folder}: cannot read the bottleneck adapter ({err}).") from err
    adapters = add_bottleneck_adapters(model, cfg)
    head = {name: tensors.pop(name) for name in HEAD_NAMES if name in tensors}
    try:
        adapters.load_state_dict(tensors, strict=True)
        if head:
            model.score.load_state_dict({k.removeprefix("score."): v for k, v in head.items()})
    except (RuntimeError, AttributeError) as err:
        raise CorruptAdapterError(f"{folder}: tensors do not fit the model ({err}).") from err
    adapters.to(next(model.parameters()).dtype)
    logger.info("loaded %s bottleneck adapter from %s", cfg.variant, folder)
    return model


# ---- the method (see trainers.methods) -----------------------------------------------------------


class BottleneckMethod(Method):
    """Bottleneck adapters on a frozen base; AdamW; saved in the bottleneck format; no quantization."""

    name = "bottleneck"
    adapter_format = "bottleneck"

    def prepare(self, model: nn.Module, config: TrainConfig, task: str) -> nn.Module:
        """Freeze the base, add seeded adapters, keep the task head (`score`) trainable."""
        from trainers.modeling import PEFT_TASK_TYPES, has_head, seed_everything

        seed_everything(config.seed)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        cfg = make_config(
            model,
            variant=config.bottleneck_variant,
            reduction_factor=config.reduction_factor,
            non_linearity=config.non_linearity,
            task_type=PEFT_TASK_TYPES[task],
            num_labels=model.config.num_labels if has_head(task) else None,
        )
        add_bottleneck_adapters(model, cfg, dropout=config.dropout)
        if has_head(task):
            model.score.requires_grad_(True)
        return model

    def save(self, model: nn.Module, out_dir: Path, tokenizer: Any = None) -> None:
        """Write the bottleneck folder."""
        save_bottleneck(model, out_dir)

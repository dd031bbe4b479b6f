"""Read one adapter version folder into tensors: PEFT LoRA, bottleneck, and the task head.

Boundary: files in, tensors out. `server.adapter_fit` first checks every tensor's name and shape against
the served base and the slots from the header alone (nothing is allocated for an adapter that does not
fit); this module then reads exactly those tensors, refuses NaN or infinite values, and hands them over
as `AdapterWeights`. Every problem is a `CorruptAdapterError` naming the file and tensor and saying how
to fix it. Nothing here touches the model or the slot banks (that is `lora_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from hub.adapter_format import REEXPORT
from hub.errors import CorruptAdapterError
from hub.manifest import Manifest
from hub.safetensors_header import TensorInfo
from server.adapter_fit import BaseLayout, plan_adapter

TORCH_DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
"""`hub.safetensors_header.ADAPTER_DTYPES` as torch dtypes."""


@dataclass
class LoraModule:
    """One target linear's LoRA factors: delta(x) = scale * (x @ a.T) @ b.T."""

    a: torch.Tensor
    """[rank, in_features]"""
    b: torch.Tensor
    """[out_features, rank]"""
    scale: float
    magnitude: torch.Tensor | None = None
    """DoRA's magnitude m [out_features]: the output is rescaled by m / ||W + scale * b @ a|| per feature."""


@dataclass
class BottleneckSite:
    """One residual bottleneck: h + up(act(down(h)))."""

    down_weight: torch.Tensor
    """[size, hidden]"""
    down_bias: torch.Tensor
    """[size]"""
    up_weight: torch.Tensor
    """[hidden, size]"""
    up_bias: torch.Tensor
    """[hidden]"""


@dataclass
class AdapterWeights:
    """Everything an adapter contributes, as checked tensors (in the file's float dtype)."""

    method: str
    """"lora", "dora" or "bottleneck"."""
    lora: dict[str, LoraModule] = field(default_factory=dict)
    rank: int = 0
    """Largest LoRA rank over its modules (0 for bottleneck)."""
    bottleneck: dict[tuple[int, str], BottleneckSite] = field(default_factory=dict)
    """(layer, "attn" | "mlp") -> site."""
    bottleneck_size: int = 0
    activation: str = ""
    head_weight: torch.Tensor | None = None
    """[num_labels, hidden] task head (`score`), if the task has one."""
    head_bias: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held."""
        tensors: list[torch.Tensor] = [
            t for m in self.lora.values() for t in (m.a, m.b, m.magnitude) if t is not None
        ]
        for site in self.bottleneck.values():
            tensors += [site.down_weight, site.down_bias, site.up_weight, site.up_bias]
        tensors += [t for t in (self.head_weight, self.head_bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


# ---- tensors ------------------------------------------------------------------------------------
def read_tensors(path: Path, infos: dict[str, TensorInfo], data_start: int) -> dict[str, torch.Tensor]:
    """Read the (already checked) tensors of `infos` from `path`.

    Raises:
        CorruptAdapterError: a tensor is truncated or holds NaN or infinite values.
    """
    tensors: dict[str, torch.Tensor] = {}
    start = min((info.begin for info in infos.values()), default=0)
    end = max((info.end for info in infos.values()), default=0)
    with open(path, "rb") as handle:  # one read of the data region, not one per tensor
        handle.seek(data_start + start)
        data = bytearray(end - start)
        got = handle.readinto(data)  # straight into the buffer the tensors view: no second copy
    if got < len(data):
        del data[got:]
    for name, info in infos.items():
        if info.end - start > len(data):
            raise CorruptAdapterError(f"{path}: tensor {name!r} is truncated.", REEXPORT)
        dtype = TORCH_DTYPES[info.dtype]
        count = (info.end - info.begin) // dtype.itemsize
        flat = (
            torch.frombuffer(data, dtype=dtype, count=count, offset=info.begin - start)
            if count
            else torch.empty(0, dtype=dtype)
        )
        # A finite sum proves every value finite (a NaN or inf would carry into it), in one cheap op;
        # only a non-finite sum (possibly an overflow of finite values) needs the element-wise check.
        if not bool(torch.isfinite(flat.sum())) and not bool(torch.isfinite(flat).all()):
            raise CorruptAdapterError(
                f"{path}: tensor {name!r} holds NaN or infinite (non-finite) values.",
                "The training run diverged or the file is damaged; retrain or re-export the adapter.",
            )
        tensors[name] = flat.reshape(info.shape)
    return tensors


# ---- folder -> tensors ---------------------------------------------------------------------------
def read_adapter(folder: Path, manifest: Manifest, layout: BaseLayout, *, max_rank: int) -> AdapterWeights:
    """Check one registered adapter version (`server.adapter_fit.plan_adapter`), then read its tensors.

    Args:
        folder: the version folder (beside its manifest.json).
        manifest: its manifest (task, labels, format, files).
        layout: the shapes of the served base.
        max_rank: the largest LoRA rank the engine's slots hold.

    Raises:
        CorruptAdapterError: missing, pickled, truncated or malformed files; tensors that do
            not fit or hold non-finite values; unsupported PEFT options.
        BaseMismatchError: a bottleneck adapter built for another hidden size or depth.
    """
    plan = plan_adapter(folder, manifest, layout, max_rank=max_rank)
    loaded = read_tensors(plan.path, plan.infos, plan.data_start)
    weights = AdapterWeights(
        method=plan.method, bottleneck_size=plan.bottleneck_size, activation=plan.activation
    )
    for module, lora in plan.lora.items():
        magnitude = loaded[lora.magnitude] if lora.magnitude else None
        weights.lora[module] = LoraModule(
            a=loaded[lora.a], b=loaded[lora.b], scale=lora.scale, magnitude=magnitude
        )
        weights.rank = max(weights.rank, lora.rank)
    for site, names in plan.bottleneck.items():
        weights.bottleneck[site] = BottleneckSite(
            down_weight=loaded[names["down.weight"]],
            down_bias=loaded[names["down.bias"]],
            up_weight=loaded[names["up.weight"]],
            up_bias=loaded[names["up.bias"]],
        )
    if "weight" in plan.head:
        weights.head_weight = loaded[plan.head["weight"]]
    if "bias" in plan.head:
        weights.head_bias = loaded[plan.head["bias"]]
    return weights

"""bf16 linears on CPU with their weights packed once in oneDNN's blocked layout.

A plain `F.linear` in bf16 on CPU hands oneDNN a row-major weight, which it reorders into its blocked
layout on every call; for the small-M matmuls of a decode step that reorder is about half the time. Packing
each weight once at load (`torch.ops.mkldnn._reorder_linear_weight`, what torch's inductor does for frozen
CPU graphs) and calling `torch.ops.mkldnn._linear_pointwise` gives the same bits (oneDNN computes the same
kernel on the same blocks; checked equal in `tests/server/test_packed_linear.py`) in about half the time:
measured here on avx512_bf16, 16 decode rows: 576->1536 116 -> 69 us, 1536->576 117 -> 59 us, lm_head
576->49152 6.2 -> 2.8 ms; at a prefill's 1,024 rows 1.0-1.2x (benchmarks/results/packed_linear_ab.md,
`python -m benchmarks.packed_linear_ab`). Only unquantized bf16 bases
on CPU are packed: NF4/int8 linears are bitsandbytes', fp32 stays plain (the path compared with PEFT exactly).

Boundary: the base's own `nn.Linear` modules, swapped in place; adapters wrap the packed modules as they
wrapped the plain ones (`server.lora_batch`).
"""

from __future__ import annotations

import torch
from torch import nn

PACK_ROWS_HINT = 16
"""The rows oneDNN is told to expect when it picks the blocking (a decode batch); any row count works."""


def can_pack(device: torch.device, dtype: torch.dtype, quantize: str = "none") -> bool:
    """Whether weights can be packed: unquantized (bitsandbytes' linears are not), bf16, on a CPU torch
    built with oneDNN. `quantize` is the base's; adapter factors are never quantized."""
    return (
        device.type == "cpu"
        and dtype == torch.bfloat16
        and quantize == "none"
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class PackedLinear(nn.Module):
    """An `nn.Linear` whose weight is held packed for oneDNN; computes exactly what the plain one did."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.packed = pack_weight(linear.weight.detach())
            self.bias = None if linear.bias is None else linear.bias.detach().clone()

    @property
    def weight(self) -> torch.Tensor:
        """The plain [out, in] weight, unpacked (exact): DoRA's column norms read it once per load."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed bf16"


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] packed for `packed_linear` / `packed_add_linear` (a copy; the input is kept)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x @ W.T for a packed W, bit for bit what `F.linear(x, W)` gives."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def packed_add_linear(y: torch.Tensor, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """y + x @ W.T for a packed W in one fused call, bit for bit what `torch.addmm(y, x, W.T)` gives."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, y, packed, None, "add")


def pack_linears(model: nn.Module) -> int:
    """Swap every plain `nn.Linear` of `model` (lm_head included) for a `PackedLinear`; -> how many.

    A tied lm_head gets its own packed copy (the embedding keeps its table for lookups).
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and module.weight.dtype == torch.bfloat16
    ]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, PackedLinear(module))
    return len(targets)

"""DoRA at inference: the per-output-feature rescaling, computed once when an adapter loads.

PEFT's DoRA linear (peft/tuners/lora/dora.py, eval mode) outputs

    base(x) + (g - 1) * (base(x) - bias) + g * scale * B(A(x)),   g = m / ||W + scale * B @ A||_row

with m the adapter's `lora_magnitude_vector` and the norm taken per output feature over the input
dimension, W the base weight as the served model holds it (dequantized when the base is NF4 or int8).
That is `g * (base(x) + delta(x)) + (1 - g) * bias`: so the engine adds the plain LoRA delta as for any
row, then applies one per-row, per-feature `y * g + shift` with `shift = (1 - g) * bias` (no shift for
layers without a bias). Rows without DoRA have g = 1 and shift = 0. `g` depends only on the weights, so
it is computed here once per adapter and layer, never per forward.

Boundary: tensors in, tensors out; which slot holds what is `server.lora_batch`'s business.
bitsandbytes is imported only for a quantized base.
"""

from __future__ import annotations

import torch
from torch import nn


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The [out, in] weight of a base linear as it computes with it, dequantized if bnb-quantized."""
    weight = linear.weight
    kind = type(weight).__name__
    if kind == "Params4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if kind == "Int8Params":
        import bitsandbytes as bnb

        scb = weight.SCB if weight.SCB is not None else linear.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb.to(weight.device))
    return weight.detach()


@torch.no_grad()
def dora_rescale(
    linear: nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float, magnitude: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DoRA's per-output-feature factor g and the bias shift (1 - g) * bias, for one layer.

    Computed in fp32 (the norm of a sum of many squares), on the layer's device.

    Args:
        linear: the base linear the adapter wraps (nn.Linear, bnb Linear4bit or Linear8bitLt).
        a: lora_A [rank, in]; b: lora_B [out, rank]; scale: the LoRA scaling; magnitude: m [out].

    Returns:
        (g [out], shift [out] or None when the layer has no bias), in fp32.
    """
    weight = dense_weight(linear).float()
    device = weight.device
    delta = b.to(device, torch.float32) @ a.to(device, torch.float32)
    norm = torch.linalg.norm(weight + scale * delta, dim=1)
    g = magnitude.to(device, torch.float32) / norm
    bias = getattr(linear, "bias", None)
    shift = None if bias is None else (1 - g) * bias.detach().float()
    return g, shift

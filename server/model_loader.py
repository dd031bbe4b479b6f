"""Load the one base model a server process serves, optionally quantized with bitsandbytes.

Boundary: turns a local HF causal-LM folder into an eval-mode `AutoModelForCausalLM` on the
serving device and reports its memory footprint. It knows nothing about adapters, batching or HTTP;
bitsandbytes is imported only when a quantized load is asked for.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hub.errors import AdapterDockError
from hub.machine import cpu_has_fast_bf16
from server.config import DTYPE_CHOICES, QUANTIZE_CHOICES, default_dtype
from server.packed_linear import can_pack, pack_linears

logger = logging.getLogger(__name__)


class ModelLoadError(AdapterDockError, RuntimeError):
    """The base cannot be loaded as asked (bad quantize choice, bitsandbytes missing or failing)."""

    default_remedy = "Serve with `--quantize none`, or install a bitsandbytes build for this machine."


class UnsupportedModelError(ModelLoadError):
    """The base is of an architecture the engine cannot run exactly (see `server.attention`)."""

    default_remedy = "Serve a base of a supported architecture (docs/server.md, Supported architectures)."


@dataclass
class LoadedBase:
    """A loaded base model and the facts the engine needs about it."""

    model: Any
    """The `AutoModelForCausalLM`, in eval mode, on `device`."""
    device: torch.device
    """Where the weights live (CUDA when available, else CPU)."""
    dtype: torch.dtype
    """Activation / compute dtype (`compute_dtype`: bf16 or fp32)."""
    quantize: str
    """nf4, int8 or none."""
    memory_footprint: int
    """Bytes the weights occupy (`get_memory_footprint()`)."""


def serving_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(device: torch.device, requested: str = "auto") -> torch.dtype:
    """What `--dtype auto|bf16|fp32` means on `device`.

    auto is bf16 on CUDA and on CPUs that compute bf16 natively (avx512_bf16 or AMX, where a decode step
    of smollm2-135m takes 0.56x the fp32 time), fp32 on other CPUs (there bf16 is emulated and slower).

    Raises:
        ModelLoadError: an unknown choice.
    """
    if requested not in DTYPE_CHOICES:
        raise ModelLoadError(f"dtype={requested!r} is not one of {', '.join(DTYPE_CHOICES)}.")
    if requested == "auto":
        fast = device.type == "cuda" or cpu_has_fast_bf16()
        return torch.bfloat16 if fast else torch.float32
    return torch.bfloat16 if requested == "bf16" else torch.float32


def cpu_threads(requested: int | None, environ: Mapping[str, str] = os.environ) -> int | None:
    """The torch intra-op threads a CPU server computes with; None leaves torch's own choice.

    `--threads` wins; else $OMP_NUM_THREADS, when set, is left to torch; else every core this process may
    run on but one. Why one less: the engine's worker is not alone, the HTTP event loop streams every token
    and tokenizes prompts, and a compute pool spread over every core makes each small op of a decode step
    wait for a descheduled thread. Measured on this 2-core machine (smollm2-135m, bf16, C=16, one run): one
    thread served 226 tok/s base-only and 156 with 8 mixed adapters, two threads 194 and 104
    (benchmarks/results/serve_bench_smollm2_threads.md); vLLM's CPU build reserves one core the same way.
    """
    if requested is not None:
        return requested
    if environ.get("OMP_NUM_THREADS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def quantization_config(quantize: str, dtype: torch.dtype) -> Any | None:
    """The `BitsAndBytesConfig` for `quantize` (None for "none"); imports bitsandbytes lazily.

    Raises:
        ModelLoadError: unknown choice, or bitsandbytes unavailable.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ModelLoadError(f"quantize={quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}.")
    if quantize == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401 - fail here with our message, not deep inside from_pretrained
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ModelLoadError(
            f"--quantize {quantize} needs bitsandbytes, which cannot be imported: {exc}."
        ) from exc
    if quantize == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base(
    path: str | Path, quantize: str = "nf4", device: torch.device | None = None, dtype: str | None = None
) -> LoadedBase:
    """Load the base at `path` for inference.

    Args:
        path: a local HF-format folder (config.json, *.safetensors, tokenizer files).
        quantize: "nf4" (4-bit NF4, double quantization), "int8" (LLM.int8) or "none".
        device: defaults to `serving_device()`.
        dtype: "auto", "bf16" or "fp32" (`compute_dtype`); None: the serving default (`default_dtype`).

    Returns:
        The loaded base with its device, compute dtype and memory footprint.

    Raises:
        ModelLoadError: if the quantization choice is unknown or the load fails.
    """
    from transformers import AutoModelForCausalLM

    device = device or serving_device()
    torch_dtype = compute_dtype(device, dtype or default_dtype())
    qconfig = quantization_config(quantize, torch_dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "use_safetensors": True}
    if qconfig is not None:
        kwargs.update(quantization_config=qconfig, device_map={"": str(device)})
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"Cannot load base {path} with quantize={quantize}: {exc}.") from exc
    if qconfig is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    footprint = int(model.get_memory_footprint())
    if can_pack(device, torch_dtype, quantize):
        logger.info("packed %d bf16 linears for oneDNN", pack_linears(model))
    logger.info(
        "loaded base %s (quantize=%s, device=%s, dtype=%s): %.1f MiB",
        path,
        quantize,
        device,
        str(torch_dtype).removeprefix("torch."),
        footprint / 2**20,
    )
    return LoadedBase(
        model=model, device=device, dtype=torch_dtype, quantize=quantize, memory_footprint=footprint
    )

"""Facts about this machine that both trainers and server act on, read without torch.

Boundary: the CPU's native bf16 support, from /proc/cpuinfo. It lives in hub (the torch-free layer both
sides import) so that the training precision and the serving dtype are decided by one rule.
"""

from __future__ import annotations

from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags under which bf16 matmuls run natively (and pay)."""


def cpu_has_fast_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bf16 matmuls natively (avx512_bf16 or AMX), read from /proc/cpuinfo.

    torch reports bf16 "supported" on any AVX-512 CPU, where it is emulated and slower than fp32; only
    these flags make bf16 pay (measured on avx512_bf16: a 135M-parameter LoRA training step 1.05-1.3 s
    against 1.5 s in fp32; a smollm2-135m decode step at batch 8, 186 ms against 335 ms). Elsewhere (no
    such flags, no /proc) the answer is no.
    """
    try:
        flags = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(flag in flags.split() for flag in NATIVE_BF16_FLAGS)

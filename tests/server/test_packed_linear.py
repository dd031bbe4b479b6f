"""oneDNN-packed bf16 linears (`server.packed_linear`) compute exactly what the plain ones do."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from server.packed_linear import PackedLinear, can_pack, pack_linears

pytestmark = pytest.mark.skipif(
    not can_pack(torch.device("cpu"), torch.bfloat16, "none"), reason="this torch has no oneDNN packing"
)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(16, 1), (3, 7), (1, 1)], ids=["decode", "prefill", "one-row"])
def test_packed_equals_plain_bit_for_bit(bias: bool, shape: tuple[int, int]) -> None:
    torch.manual_seed(0)
    plain = nn.Linear(96, 80, bias=bias).to(torch.bfloat16)
    packed = PackedLinear(plain)
    x = torch.randn(*shape, 96).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(packed(x), plain(x))
    assert torch.equal(packed.weight, plain.weight)  # DoRA's norms read the unpacked weight
    assert (packed.in_features, packed.out_features) == (96, 80)


def test_pack_linears_swaps_plain_bf16_linears_only() -> None:
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 16), nn.LayerNorm(16)).to(torch.bfloat16)
    model.append(nn.Linear(16, 8))  # fp32: stays plain (fp32 is the path compared with PEFT exactly)
    x = torch.randn(2, 32).to(torch.bfloat16)
    with torch.inference_mode():
        want = model[:3](x)
        assert pack_linears(model) == 2
        assert torch.equal(model[:3](x), want)
    assert [type(m).__name__ for m in model] == ["PackedLinear", "PackedLinear", "LayerNorm", "Linear"]


def test_only_unquantized_bf16_on_cpu_is_packed() -> None:
    cpu = torch.device("cpu")
    assert not can_pack(cpu, torch.float32, "none")
    assert not can_pack(cpu, torch.bfloat16, "nf4")
    assert not can_pack(torch.device("cuda"), torch.bfloat16, "none")

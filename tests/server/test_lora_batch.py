"""Per-row adapter math against a plain per-row loop."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from server.adapter_weights import AdapterWeights, BaseLayout, BottleneckSite, LoraModule
from server.errors import ConcurrentForwardError
from server.lora_batch import AdapterBanks


class _Block(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        self.mlp = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.self_attn, name, nn.Linear(hidden, hidden, bias=False))
        self.mlp.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.mlp.up_proj = nn.Linear(hidden, inter, bias=False)
        self.mlp.down_proj = nn.Linear(inter, hidden, bias=False)


def _model_and_banks(slots: int = 5, max_rank: int = 8):
    torch.manual_seed(0)
    hidden, inter = 16, 24
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([_Block(hidden, inter)])
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
              "mlp.down_proj": (inter, hidden)}  # fmt: skip
    layout = BaseLayout(hidden, 1, {f"model.layers.0.{k}": v for k, v in shapes.items()})
    banks = AdapterBanks(model, layout, num_slots=slots, max_rank=max_rank, dtype=torch.float32, device="cpu")
    return model, banks


def _lora(rank: int, in_f: int, out_f: int, scale: float) -> AdapterWeights:
    module = LoraModule(a=torch.randn(rank, in_f), b=torch.randn(out_f, rank), scale=scale)
    return AdapterWeights(method="lora", lora={"model.layers.0.self_attn.q_proj": module}, rank=rank)


@pytest.mark.parametrize("tokens", [1, 3], ids=["decode", "prefill"])
def test_rows_get_their_own_adapter_and_slot_zero_gets_none(tokens: int):
    """Mixed ranks in one batch; decode (one token a row: the batch's adapters concatenated and masked)
    and prefill (per-row factors padded to the largest rank) both give each row exactly its own delta."""
    model, banks = _model_and_banks()
    attn = model.model.layers[0].self_attn
    q = attn.q_proj
    adapters = {1: _lora(2, 16, 16, 0.5), 2: _lora(8, 16, 16, 2.0), 3: _lora(4, 16, 16, 1.0)}
    for slot, weights in adapters.items():
        banks.write(slot, weights)
    x = torch.randn(5, tokens, 16)
    slots = [1, 0, 2, 3, 2]
    with banks.forward(slots):
        got = q(x)
        untouched = attn.k_proj(x)  # no row's adapter adapts k_proj
    assert banks.context is None
    assert torch.equal(untouched, attn.k_proj.base(x))
    for row, slot in enumerate(slots):
        want = q.base(x[row])
        if slot:
            m = adapters[slot].lora["model.layers.0.self_attn.q_proj"]
            want = want + m.scale * (x[row] @ m.a.t()) @ m.b.t()
        torch.testing.assert_close(got[row], want, rtol=1e-5, atol=1e-5)


def test_uniform_fast_path_equals_gather_path_and_no_context_is_base():
    model, banks = _model_and_banks()
    q = model.model.layers[0].self_attn.q_proj
    banks.write(1, _lora(4, 16, 16, 1.5))
    x = torch.randn(3, 2, 16)
    banks.context = banks.context_for([1, 1, 1])
    assert banks.context.uniform_slot == 1
    fast = q(x)
    ctx = banks.context_for([1, 1, 1])
    ctx.uniform_slot = None
    banks.context = ctx
    gathered = q(x)
    banks.context = None
    torch.testing.assert_close(fast, gathered, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q(x), q.base(x))


def test_reloading_a_slot_invalidates_gathered_factors():
    model, banks = _model_and_banks()
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 1, 16)
    banks.write(1, _lora(8, 16, 16, 1.0))
    banks.context = banks.context_for([1, 0])
    q(x)  # gathers and caches slot 1's factors for this batch composition
    banks.clear(1)
    small = _lora(2, 16, 16, 1.0)
    banks.write(1, small)
    assert len(banks.lora["model.layers.0.self_attn.q_proj"].factors.pages[1]) == 2  # rank 2: 2 pages
    banks.context = banks.context_for([1, 0])
    got = q(x)
    banks.context = None
    m = small.lora["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(got[0], q.base(x[0]) + (x[0] @ m.a.t()) @ m.b.t())
    torch.testing.assert_close(got[1], q.base(x[1]))


def test_bottleneck_rows_with_different_activations():
    model, banks = _model_and_banks()
    o = model.model.layers[0].self_attn.o_proj
    sites = {}
    for slot, act in ((1, "relu"), (2, "silu")):
        site = BottleneckSite(torch.randn(4, 16), torch.randn(4), torch.randn(16, 4), torch.randn(16))
        sites[slot] = (site, act)
        banks.write(
            slot,
            AdapterWeights(method="bottleneck", bottleneck={(0, "attn"): site}, bottleneck_size=4,
                           activation=act),
        )  # fmt: skip
    x = torch.randn(3, 2, 16)
    banks.context = banks.context_for([2, 0, 1])
    got = o(x)
    banks.context = None
    for row, slot in enumerate([2, 0, 1]):
        h = o.base(x[row])
        if slot:
            site, act = sites[slot]
            fn = torch.relu if act == "relu" else torch.nn.functional.silu
            h = h + fn(h @ site.down_weight.t() + site.down_bias) @ site.up_weight.t() + site.up_bias
        torch.testing.assert_close(got[row], h, rtol=1e-5, atol=1e-5)


def test_a_forward_overlapping_another_is_refused_loudly():
    model, banks = _model_and_banks()
    q = model.model.layers[0].self_attn.q_proj
    banks.write(1, _lora(4, 16, 16, 1.0))
    inside, leave = threading.Event(), threading.Event()

    def worker() -> None:
        with banks.forward([1, 1]):
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=worker, name="adapterdock-engine")
    thread.start()
    try:
        assert inside.wait(10)
        with pytest.raises(ConcurrentForwardError, match="'adapterdock-engine'"), banks.forward([0, 0]):
            pass
        assert banks.context is not None and banks.context.uniform_slot == 1  # the worker's, untouched
    finally:
        leave.set()
        thread.join()
    x = torch.randn(2, 1, 16)
    with banks.forward([0, 0]):  # free again once the other forward ended
        torch.testing.assert_close(q(x), q.base(x))


def test_bf16_decode_on_packed_factors_equals_the_plain_matmuls(monkeypatch: pytest.MonkeyPatch):
    """On CPU in bf16 a mixed decode step runs on oneDNN-packed factors (`server.packed_linear`): the same
    bits as the plain matmuls it replaces."""
    from server import adapter_pages
    from server.packed_linear import can_pack

    if not can_pack(torch.device("cpu"), torch.bfloat16, "none"):
        pytest.skip("this torch has no oneDNN packing")
    torch.manual_seed(0)
    model, _ = _model_and_banks()
    model.to(torch.bfloat16)
    layout = _model_and_banks()[1].layout
    banks = AdapterBanks(model, layout, num_slots=5, max_rank=8, dtype=torch.bfloat16, device="cpu")
    q = model.model.layers[0].self_attn.q_proj
    banks.write(1, _lora(2, 16, 16, 0.5))
    banks.write(2, _lora(8, 16, 16, 2.0))
    x = torch.randn(4, 1, 16).to(torch.bfloat16)
    with banks.forward([1, 0, 2, 1]):
        packed = q(x)
    monkeypatch.setattr(adapter_pages, "can_pack", lambda *args: False)
    banks.clear(3)  # any write drops the cached (packed) factors
    with banks.forward([1, 0, 2, 1]):
        plain = q(x)
    assert torch.equal(packed, plain)
    assert torch.equal(packed[1], q.base(x[1]))  # the base row gets no delta

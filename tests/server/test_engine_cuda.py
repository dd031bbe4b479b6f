"""The engine on a GPU: bf16 compute, an NF4 base with double quantization, per-row LoRA against PEFT.

Skipped without a CUDA device (CI has none); run on a GPU machine with `pytest -m gpu`. bf16 kernels
differ between a batched and a single-row forward, so logits are compared by cosine and relative error,
not to fp32 tolerances; the numbers are printed for the record.
"""

from __future__ import annotations

import pytest
import torch

from hub.bases import BaseInfo

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Hello there", "Adapters share one base model."]


@pytest.fixture(scope="module")
def cuda_engines(tiny_base: BaseInfo) -> dict[str, object]:
    from server.engine import Engine

    return {
        quantize: Engine(
            tiny_base.path,
            base_name="tiny",
            quantize=quantize,
            max_adapters=4,
            max_rank=32,
            max_batch_size=8,
            max_seq_len=128,
        )  # fmt: skip
        for quantize in ("none", "nf4")
    }


def agreement(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(cosine similarity, max |got - want| / max |want|) of two logit vectors."""
    got, want = got.float().flatten(), want.float().flatten()
    cosine = float(torch.nn.functional.cosine_similarity(got, want, dim=0))
    return cosine, float((got - want).abs().max() / want.abs().max())


def ids(engine, texts: list[str]) -> list[list[int]]:
    return [engine.tokenizer(t)["input_ids"] for t in texts]


def test_engines_run_on_cuda_in_bf16_and_nf4_is_double_quantized(cuda_engines) -> None:
    import bitsandbytes as bnb

    full, nf4 = cuda_engines["none"], cuda_engines["nf4"]
    for engine in (full, nf4):
        assert engine.device.type == "cuda" and engine.dtype == torch.bfloat16
    linears = [m for m in nf4.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert linears, "the NF4 base must hold 4-bit linears"
    state = linears[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested, "NF4 with double quantization"
    assert linears[0].compute_dtype == torch.bfloat16
    mib = full.memory_footprint / 2**20, nf4.memory_footprint / 2**20
    print(f"footprint none {mib[0]:.2f} MiB, nf4 {mib[1]:.2f} MiB")
    assert nf4.memory_footprint < 0.7 * full.memory_footprint


def test_per_row_lora_on_cuda_matches_peft_in_bf16(cuda_engines, adapters, tiny_base: BaseInfo) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine = cuda_engines["none"]
    a = adapters["gen-a"]
    adapter = engine.load_adapter(a.key, a.path, a.manifest)
    try:
        base = AutoModelForCausalLM.from_pretrained(tiny_base.path, dtype=torch.bfloat16).cuda()
        reference = PeftModel.from_pretrained(base, a.path).eval()
        prompts = ids(engine, PROMPTS)
        logits = engine.prefill([1, 2, 3, 4], [*prompts, prompts[0]], [adapter.slot] * 3 + [0])
        for seq_id in (1, 2, 3, 4):
            engine.release(seq_id)
        with torch.inference_mode():
            want = [reference(input_ids=torch.tensor([p], device="cuda")).logits[0, -1] for p in prompts]
            with reference.disable_adapter():
                base_row = reference(input_ids=torch.tensor([prompts[0]], device="cuda")).logits[0, -1]
        for got, expected in zip(logits[:3], want, strict=True):
            cosine, relative = agreement(got, expected)
            print(f"per-row LoRA vs PEFT (bf16): cosine {cosine:.5f}, max rel err {relative:.4f}")
            assert cosine > 0.999 and relative < 0.05
        cosine, _ = agreement(logits[3], base_row)
        assert cosine > 0.999, "the base row in the same batch gets no adapter"
    finally:
        engine.unload_adapter(adapter)


def test_nf4_engine_tracks_the_bf16_engine_with_an_adapter(cuda_engines, adapters) -> None:
    full, nf4 = cuda_engines["none"], cuda_engines["nf4"]
    a = adapters["gen-b"]
    loaded = [engine.load_adapter(a.key, a.path, a.manifest) for engine in (full, nf4)]
    try:
        prompts = ids(full, PROMPTS)
        outs = []
        for engine, adapter in zip((full, nf4), loaded, strict=True):
            outs.append(engine.prefill([1, 2, 3], prompts, [adapter.slot] * 3))
            for seq_id in (1, 2, 3):
                engine.release(seq_id)
        for got, want in zip(outs[1], outs[0], strict=True):
            cosine, relative = agreement(got, want)
            print(f"NF4 vs bf16 engine logits: cosine {cosine:.4f}, max rel err {relative:.3f}")
            assert cosine > 0.9
    finally:
        for engine, adapter in zip((full, nf4), loaded, strict=True):
            engine.unload_adapter(adapter)


def test_dora_on_cuda_matches_peft_in_bf16_beside_lora_and_base_rows(
    cuda_engines, adapters, tiny_base: BaseInfo
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine = cuda_engines["none"]
    d, a = adapters["dora-a"], adapters["gen-a"]
    dora, lora = (engine.load_adapter(x.key, x.path, x.manifest) for x in (d, a))
    try:
        base = AutoModelForCausalLM.from_pretrained(tiny_base.path, dtype=torch.bfloat16).cuda()
        reference = PeftModel.from_pretrained(base, d.path).eval()
        prompts = ids(engine, PROMPTS)
        logits = engine.prefill([1, 2, 3, 4], [prompts[0], prompts[1], prompts[1], prompts[2]],
                                [dora.slot, lora.slot, dora.slot, 0])  # fmt: skip
        for seq_id in (1, 2, 3, 4):
            engine.release(seq_id)
        with torch.inference_mode():
            want = [reference(input_ids=torch.tensor([p], device="cuda")).logits[0, -1] for p in prompts[:2]]
        for got, expected in zip((logits[0], logits[2]), want, strict=True):
            cosine, relative = agreement(got, expected)
            print(f"per-row DoRA vs PEFT (bf16): cosine {cosine:.5f}, max rel err {relative:.4f}")
            assert cosine > 0.999 and relative < 0.05
    finally:
        engine.unload_adapter(dora)
        engine.unload_adapter(lora)

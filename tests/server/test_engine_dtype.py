"""Serving compute dtype and threads: what `--dtype auto|bf16|fp32` and `--threads` pick; bf16 against PEFT.

fp32 is compared with PEFT exactly elsewhere (test_engine.py). In bf16 the engine and PEFT round at
different points (the engine adds each row's LoRA delta from gathered factors, PEFT per module), so the
stated tolerance is: logits within 3% of their spread, and the same greedy token wherever PEFT's top token
leads its runner-up by more than that.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hub.machine import cpu_has_fast_bf16
from server import model_loader
from server.config import ServerConfig
from server.errors import ServerConfigError
from server.model_loader import ModelLoadError, compute_dtype

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Hello there", "Adapters share one base."]
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
TOLERANCE = 0.03
"""Largest |ours - PEFT's| logit in bf16, as a share of the logits' spread (measured: under 0.01)."""


def test_cpu_flags_decide_native_bf16(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx512vl\n")
    assert cpu_has_fast_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512vl\n")  # AVX-512 alone emulates bf16
    assert not cpu_has_fast_bf16(info)
    info.write_text("flags : amx_bf16 amx_tile\n")
    assert cpu_has_fast_bf16(info)
    assert not cpu_has_fast_bf16(tmp_path / "missing")


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_is_bf16_where_the_cpu_computes_it_natively(
    monkeypatch: pytest.MonkeyPatch, native: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(model_loader, "cpu_has_fast_bf16", lambda: native)
    assert compute_dtype(CPU, "auto") == expected
    assert compute_dtype(CUDA, "auto") == torch.bfloat16
    assert compute_dtype(CPU, "fp32") == torch.float32
    assert compute_dtype(CPU, "bf16") == torch.bfloat16


def test_an_unknown_dtype_is_refused_with_the_choices() -> None:
    with pytest.raises(ModelLoadError, match="auto, bf16, fp32"):
        compute_dtype(CPU, "fp16")
    with pytest.raises(ServerConfigError, match="dtype='half' is not one of auto, bf16, fp32"):
        ServerConfig(dtype="half").validate()


def test_the_default_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERDOCK_DTYPE", "bf16")
    assert ServerConfig().dtype == "bf16"
    monkeypatch.delenv("ADAPTERDOCK_DTYPE")
    assert ServerConfig().dtype == "auto"


@pytest.fixture(scope="module")
def bf16_engine(tiny_base):
    from server.engine import Engine

    return Engine(tiny_base.path, base_name="tiny", quantize="none", dtype="bf16", max_adapters=6,
                  max_rank=16, max_batch_size=4, max_seq_len=64)  # fmt: skip


def _assert_close_in_bf16(ours: torch.Tensor, reference: torch.Tensor) -> None:
    spread = (reference.max() - reference.min()).item()
    assert (ours - reference).abs().max().item() <= TOLERANCE * spread
    top2 = reference.topk(2).values
    if (top2[0] - top2[1]).item() > TOLERANCE * spread:
        assert ours.argmax().item() == reference.argmax().item()


def test_a_bf16_engine_keeps_cache_and_banks_in_bf16_and_matches_peft_in_bf16(
    bf16_engine, adapters, tiny_base
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert bf16_engine.dtype == torch.bfloat16
    assert bf16_engine.k_cache.dtype == bf16_engine.v_cache.dtype == torch.bfloat16
    gen = adapters["gen-a"]
    adapter = bf16_engine.load_adapter(gen.key, gen.path, gen.manifest)
    try:
        prompts = [bf16_engine.tokenizer(t)["input_ids"] for t in PROMPTS]
        logits = bf16_engine.prefill([1, 2, 3], prompts, [adapter.slot, 0, adapter.slot])
        nexts = logits.argmax(-1).tolist()
        step = bf16_engine.decode(nexts)  # a decode step takes another path (the delta in fp32)
        for seq_id in (1, 2, 3):
            bf16_engine.release(seq_id)
    finally:
        bf16_engine.unload_adapter(adapter)
    base = AutoModelForCausalLM.from_pretrained(tiny_base.path, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        longer = [p + [n] for p, n in zip(prompts, nexts, strict=True)]
        plain = [base(torch.tensor([p])).logits[0, -1].float() for p in prompts]
        plain_next = base(torch.tensor([longer[1]])).logits[0, -1].float()
        peft = PeftModel.from_pretrained(base, gen.path).eval()
        tuned = [peft(torch.tensor([p])).logits[0, -1].float() for p in prompts]
        tuned_next = [peft(torch.tensor([p])).logits[0, -1].float() for p in longer]
    for row, reference in zip(logits, [tuned[0], plain[1], tuned[2]], strict=True):
        _assert_close_in_bf16(row, reference)
    for row, reference in zip(step, [tuned_next[0], plain_next, tuned_next[2]], strict=True):
        _assert_close_in_bf16(row, reference)
    for with_adapter, without in zip(tuned, plain, strict=True):  # the tolerance tells them apart
        spread = (with_adapter.max() - with_adapter.min()).item()
        assert (with_adapter - without).abs().max().item() > 3 * TOLERANCE * spread


def test_heads_bottleneck_and_dora_serve_in_bf16_close_to_fp32(bf16_engine, engine, adapters) -> None:
    """Every adapter kind runs on a bf16 engine; task heads compute in fp32 (a reward keeps fp32's digits)
    and land near the fp32 engine's answers."""
    import asyncio

    from server.config import ServerConfig
    from server.prompts import task_inputs
    from server.scheduler import Scheduler

    def answers(eng) -> tuple[list, list, list, torch.Tensor]:
        loaded = {n: eng.load_adapter(adapters[n].key, adapters[n].path, adapters[n].manifest)
                  for n in ("cls", "ner", "reward", "bneck", "dora-a")}  # fmt: skip

        async def tasks() -> tuple[list, list, list]:
            scheduler = Scheduler(eng, max_batch_size=4)
            await scheduler.start()
            try:
                plain = await task_inputs(eng.tokenizer, PROMPTS, ServerConfig())
                spans = await task_inputs(eng.tokenizer, PROMPTS, ServerConfig(), offsets=True)
                classes = await scheduler.classify(loaded["cls"], plain)
                return (
                    classes,
                    await scheduler.ner(loaded["ner"], spans),
                    await scheduler.score(loaded["reward"], plain),
                )
            finally:
                await scheduler.stop()

        try:
            classes, entities, rewards = asyncio.run(tasks())
            ids = [eng.tokenizer(t)["input_ids"] for t in PROMPTS[:2]]
            logits = eng.prefill([7, 8], ids, [loaded["bneck"].slot, loaded["dora-a"].slot])
            step = eng.decode(logits.argmax(-1).tolist())
            eng.release(7), eng.release(8)
        finally:
            for adapter in loaded.values():
                eng.unload_adapter(adapter)
        return classes, entities, rewards, step

    ours, reference = answers(bf16_engine), answers(engine)
    assert bf16_engine.dtype == torch.bfloat16 and engine.dtype == torch.float32
    for got, want in zip(ours[0], reference[0], strict=True):
        assert max(abs(got["scores"][k] - want["scores"][k]) for k in want["scores"]) < 0.02
    assert [len(e) for e in ours[1]] == [len(e) for e in reference[1]]
    assert all(abs(got - want) < 0.02 for got, want in zip(ours[2], reference[2], strict=True))
    as_bf16 = torch.tensor(ours[2]).to(torch.bfloat16).float().tolist()
    assert all(r != b for r, b in zip(ours[2], as_bf16, strict=True)), "rewards keep fp32 precision"
    for row, want in zip(ours[3], reference[3], strict=True):
        _assert_close_in_bf16(row, want)


def test_cpu_threads_leave_one_core_to_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_loader.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert model_loader.cpu_threads(None, {}) == 3
    assert model_loader.cpu_threads(2, {}) == 2  # --threads wins
    assert model_loader.cpu_threads(None, {"OMP_NUM_THREADS": "2"}) is None  # torch keeps the env's
    monkeypatch.setattr(model_loader.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert model_loader.cpu_threads(None, {}) == 1  # never zero
    with pytest.raises(ServerConfigError, match="threads=0 must be at least 1"):
        ServerConfig(threads=0).validate()

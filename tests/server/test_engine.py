"""The engine's invariants: our forward == HF's, per-row LoRA == PEFT, mixed batches == solo runs."""

from __future__ import annotations

import shutil

import pytest
import torch

from hub.errors import CorruptAdapterError
from tests.server.conftest import CLS_LABELS, NER_LABELS

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello there",
    "Adapters share one base model, row by row, in every forward pass.",
]


def _ids(engine, texts):
    return [engine.tokenizer(t)["input_ids"] for t in texts]


def _greedy(engine, prompts, slots, steps):
    """Greedy tokens per prompt, prefilled together and decoded in shared steps."""
    base_id = 1000 + len(engine.active_ids)
    seq_ids = list(range(base_id, base_id + len(prompts)))
    out = {s: [] for s in seq_ids}
    logits = engine.prefill(seq_ids, prompts, slots)
    for s, row in zip(seq_ids, logits.argmax(-1).tolist(), strict=True):
        out[s].append(row)
    for _ in range(steps - 1):
        order = engine.active_ids
        logits = engine.decode([out[s][-1] for s in order])
        for s, tok in zip(order, logits.argmax(-1).tolist(), strict=True):
            out[s].append(tok)
    for s in seq_ids:
        engine.release(s)
    return [out[s] for s in seq_ids]


@pytest.fixture(scope="module")
def hf_model(tiny_base):
    """The tiny base as plain transformers runs it (the engine's model runs only with its KV cache)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base.path).eval()


@pytest.fixture
def loaded(engine, adapters):
    """Load adapters by name for one test and unload them after it."""
    held = []

    def load(name):
        a = adapters[name]
        adapter = engine.load_adapter(a.key, a.path, a.manifest)
        held.append(adapter)
        return adapter

    yield load
    for adapter in held:
        engine.unload_adapter(adapter)


def test_prefill_and_decode_match_hf_forward(engine, hf_model):
    prompts = _ids(engine, PROMPTS)
    with torch.inference_mode():
        reference = [hf_model(torch.tensor([p])).logits[0, -1] for p in prompts]
    logits = engine.prefill([1, 2, 3], prompts, [0, 0, 0])
    for row, ref in zip(logits, reference, strict=True):
        torch.testing.assert_close(row, ref, rtol=1e-4, atol=1e-4)
    seqs = [p + [int(t)] for p, t in zip(prompts, logits.argmax(-1), strict=True)]
    for _ in range(3):
        logits = engine.decode([s[-1] for s in seqs])
        with torch.inference_mode():
            reference = [hf_model(torch.tensor([s])).logits[0, -1] for s in seqs]
        for row, ref in zip(logits, reference, strict=True):
            torch.testing.assert_close(row, ref, rtol=1e-4, atol=1e-4)
        seqs = [s + [int(t)] for s, t in zip(seqs, logits.argmax(-1), strict=True)]
    # retiring a middle row moves the last one into its place; its logits stay right
    engine.release(2)
    logits = engine.decode([seqs[0][-1], seqs[2][-1]])
    with torch.inference_mode():
        ref = hf_model(torch.tensor([seqs[2]])).logits[0, -1]
    torch.testing.assert_close(logits[1], ref, rtol=1e-4, atol=1e-4)
    engine.release(1)
    engine.release(3)
    assert engine.active_ids == []


@pytest.mark.parametrize("name", ["gen-a", "gen-b", "gen-c"])
def test_per_row_lora_matches_peft(engine, adapters, loaded, tiny_base, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = loaded(name)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base.path), adapters[name].path
    ).eval()
    prompts = _ids(engine, PROMPTS)
    with torch.inference_mode():
        reference = [peft_model(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts]
    # the adapter's rows share the batch with base rows
    logits = engine.prefill([1, 2, 3, 4], [*prompts, prompts[0]], [adapter.slot] * 3 + [0])
    for row, ref in zip(logits[:3], reference, strict=True):
        torch.testing.assert_close(row, ref, rtol=1e-4, atol=1e-4)
    assert (logits[3] - reference[0]).abs().max() > 1e-2, "the base row must not get the adapter"
    for seq_id in (1, 2, 3, 4):
        engine.release(seq_id)


def test_mixed_ranks_in_one_batch_match_peft_and_take_pages_by_rank(engine, adapters, loaded, tiny_base):
    """Ranks 8, 4 (on q/v only) and 16 in one prefill: each row equals PEFT alone; each adapter holds
    pages for its own rank and target modules only, and gives them back when unloaded."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    before = engine.banks.used_bytes
    names = ["gen-a", "gen-b", "gen-c"]
    held = {n: loaded(n) for n in names}
    assert engine.banks.used_bytes - before == sum(a.nbytes for a in held.values())
    assert held["gen-b"].nbytes < held["gen-a"].nbytes < held["gen-c"].nbytes
    prompt = _ids(engine, PROMPTS[:1])[0]
    logits = engine.prefill([1, 2, 3, 4], [prompt] * 4, [held[n].slot for n in names] + [0])
    for seq_id in (1, 2, 3, 4):
        engine.release(seq_id)
    for row, name in zip(logits, names, strict=False):
        peft_model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_base.path), adapters[name].path
        ).eval()
        with torch.inference_mode():
            ref = peft_model(input_ids=torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(row, ref, rtol=1e-4, atol=1e-4)
    engine.unload_adapter(held["gen-c"])
    assert engine.banks.used_bytes - before == held["gen-a"].nbytes + held["gen-b"].nbytes


def _peft_greedy(peft_model, prompt, steps):
    """Greedy tokens and each step's last-token logits of PEFT on one prompt (no cache: the reference)."""
    seq, tokens, logits = list(prompt), [], []
    with torch.inference_mode():
        for _ in range(steps):
            row = peft_model(input_ids=torch.tensor([seq])).logits[0, -1]
            logits.append(row)
            tokens.append(int(row.argmax()))
            seq.append(tokens[-1])
    return tokens, logits


def _greedy_logits(engine, prompts, slots, steps):
    """Like `_greedy`, and also each row's logits at every step."""
    seq_ids = list(range(2000, 2000 + len(prompts)))
    toks = {s: [] for s in seq_ids}
    rows = {s: [] for s in seq_ids}
    logits = engine.prefill(seq_ids, prompts, slots)
    for s, row in zip(seq_ids, logits, strict=True):
        rows[s].append(row)
        toks[s].append(int(row.argmax()))
    for _ in range(steps - 1):
        order = engine.active_ids
        logits = engine.decode([toks[s][-1] for s in order])
        for s, row in zip(order, logits, strict=True):
            rows[s].append(row)
            toks[s].append(int(row.argmax()))
    for s in seq_ids:
        engine.release(s)
    return [toks[s] for s in seq_ids], [rows[s] for s in seq_ids]


@pytest.mark.parametrize("name", ["dora-a", "dora-b"])
def test_dora_matches_peft_alone_and_in_a_mixed_batch(engine, adapters, loaded, tiny_base, name):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dora = loaded(name)
    lora_a, lora_b = loaded("gen-a"), loaded("gen-b")
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base.path), adapters[name].path
    ).eval()
    prompts = _ids(engine, PROMPTS)
    reference = [_peft_greedy(peft_model, p, steps=6) for p in prompts]
    with peft_model.disable_adapter():
        base_reference = _peft_greedy(peft_model, prompts[0], steps=6)
    alone_tokens, alone_logits = _greedy_logits(engine, prompts, [dora.slot] * 3, steps=6)
    # DoRA rows beside LoRA rows and a base row, in one batch
    slots = [dora.slot, lora_a.slot, dora.slot, 0, lora_b.slot, dora.slot]
    mixed_prompts = [prompts[0], prompts[1], prompts[1], prompts[0], prompts[2], prompts[2]]
    mixed_tokens, mixed_logits = _greedy_logits(engine, mixed_prompts, slots, steps=6)
    for i, (tokens, logits) in enumerate(reference):
        assert alone_tokens[i] == tokens
        torch.testing.assert_close(torch.stack(alone_logits[i]), torch.stack(logits), rtol=1e-4, atol=1e-4)
    for row, i in ((0, 0), (2, 1), (5, 2)):
        assert mixed_tokens[row] == reference[i][0]
        torch.testing.assert_close(
            torch.stack(mixed_logits[row]), torch.stack(reference[i][1]), rtol=1e-4, atol=1e-4
        )
    assert mixed_tokens[3] == base_reference[0], "the base row is the base"
    torch.testing.assert_close(
        torch.stack(mixed_logits[3]), torch.stack(base_reference[1]), rtol=1e-4, atol=1e-4
    )
    solo_lora = _greedy_logits(engine, [prompts[1], prompts[2]], [lora_a.slot, lora_b.slot], steps=6)
    assert [mixed_tokens[1], mixed_tokens[4]] == solo_lora[0], "LoRA rows keep their solo output"
    for got, want in ((mixed_logits[1], solo_lora[1][0]), (mixed_logits[4], solo_lora[1][1])):
        torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-5, atol=1e-5)
    assert alone_tokens[0] != base_reference[0], "the DoRA adapter must change the output"


def test_dora_magnitude_is_not_plain_lora(engine, adapters, loaded, tiny_base):
    """Dropping the magnitude (serving the factors as a plain LoRA) would give other logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dora = loaded("dora-a")
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base.path), adapters["dora-a"].path
    ).eval()
    for module in peft_model.modules():  # the same factors, without the magnitude: plain LoRA
        if hasattr(module, "lora_variant"):
            module.lora_variant.clear()
    prompt = _ids(engine, PROMPTS[:1])
    with torch.inference_mode():
        plain = peft_model(input_ids=torch.tensor(prompt)).logits[0, -1]
    ours = engine.prefill([1], prompt, [dora.slot])[0]
    engine.release(1)
    assert (ours - plain).abs().max() > 1e-2


def _set_parts(adapters, spec):
    """(name@version, folder, manifest, weight) for `engine.load_adapter_set`."""
    return [(adapters[n].key, adapters[n].path, adapters[n].manifest, w) for n, w in spec]


@pytest.mark.parametrize(
    "spec",
    [
        [("gen-a", 0.5), ("gen-d", 0.5)],  # equal ranks (8 + 8)
        [
            ("gen-a", 0.7),
            ("gen-c", -0.4),
            ("gen-b", 1.5),
        ],  # ranks 8 + 16 + 4; rsLoRA, alpha_pattern, q/v only
    ],
    ids=["equal-ranks", "different-ranks"],
)
def test_weighted_set_equals_peft_cat_in_a_batch_with_plain_rows(engine, adapters, tiny_base, spec):
    """A set is PEFT's add_weighted_adapter(..., "cat"): tokens and logits, beside LoRA and base rows."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # PEFT's combined adapter copies the first part's config (rsLoRA included) with r = alpha = sum of ranks:
    # the first part here is a plain LoRA, so the combined scaling is 1, as in the weighted sum of deltas
    names = [n for n, _ in spec]
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base.path), adapters[names[0]].path, adapter_name=names[0]
    )
    for name in names[1:]:
        peft_model.load_adapter(adapters[name].path, adapter_name=name)
    peft_model.add_weighted_adapter(names, [w for _, w in spec], "mix", combination_type="cat")
    peft_model.set_adapter("mix")
    peft_model.eval()
    combined = engine.load_adapter_set("set", _set_parts(adapters, spec))
    plain = engine.load_adapter(adapters["gen-a"].key, adapters["gen-a"].path, adapters["gen-a"].manifest)
    try:
        prompts = _ids(engine, PROMPTS)
        reference = [_peft_greedy(peft_model, p, steps=6) for p in prompts[:2]]
        slots = [combined.slot, plain.slot, combined.slot, 0]
        tokens, logits = _greedy_logits(
            engine, [prompts[0], prompts[2], prompts[1], prompts[2]], slots, steps=6
        )
        solo = _greedy_logits(engine, [prompts[2], prompts[2]], [plain.slot, 0], steps=6)
    finally:
        engine.unload_adapter(combined)
        engine.unload_adapter(plain)
    for row, (want_tokens, want_logits) in zip((0, 2), reference, strict=True):
        assert tokens[row] == want_tokens
        torch.testing.assert_close(torch.stack(logits[row]), torch.stack(want_logits), rtol=1e-4, atol=1e-4)
    assert [tokens[1], tokens[3]] == solo[0], "plain rows keep their solo output"
    with peft_model.disable_adapter():
        base_tokens, _ = _peft_greedy(peft_model, prompts[0], steps=6)
    assert tokens[0] != base_tokens, "the set must change the output"


def test_weighted_set_refuses_dora_and_ranks_past_max_rank(engine, adapters):
    from server.errors import AdapterSetTooLargeError, NotCombinableError

    free = engine.free_slots
    with pytest.raises(NotCombinableError, match="dora-a@1 in the adapter set s is a DoRA adapter"):
        engine.load_adapter_set("s", _set_parts(adapters, [("gen-a", 1.0), ("dora-a", 1.0)]))
    with pytest.raises(NotCombinableError, match="bottleneck"):
        engine.load_adapter_set("s", _set_parts(adapters, [("gen-a", 1.0), ("bneck", 1.0)]))
    too_big = [("gen-a", 1.0), ("gen-c", 1.0), ("gen-d", 1.0)]  # 8 + 16 + 8 = 32: fits --max-rank 32
    engine.unload_adapter(engine.load_adapter_set("s", _set_parts(adapters, too_big)))
    too_big.append(("zero", 1.0))  # + 8 = 40 > 32
    with pytest.raises(AdapterSetTooLargeError, match=r"8 \+ 16 \+ 8 \+ 8 = 40 .* --max-rank 32"):
        engine.load_adapter_set("s", _set_parts(adapters, too_big))
    assert engine.free_slots == free


def test_zero_b_lora_equals_base(engine, loaded):
    zero = loaded("zero")
    prompts = _ids(engine, PROMPTS)
    base = engine.prefill([1, 2, 3], prompts, [0, 0, 0])
    with_zero = engine.prefill([4, 5, 6], prompts, [zero.slot] * 3)
    torch.testing.assert_close(with_zero, base)
    for seq_id in range(1, 7):
        engine.release(seq_id)


def test_mixed_batch_equals_solo_runs(engine, loaded):
    slots = [loaded(n).slot for n in ("gen-a", "gen-b", "gen-c", "bneck")] + [0]
    prompts = _ids(engine, [*PROMPTS, "One more prompt", "And the last one, a bit longer"])
    solo = [_greedy(engine, [p], [s], steps=8)[0] for p, s in zip(prompts, slots, strict=True)]
    mixed = _greedy(engine, prompts, slots, steps=8)
    assert mixed == solo
    assert len({tuple(t) for t in solo}) > 1, "adapters must change the output"


def test_rows_join_mid_decode_and_keep_their_output(engine, loaded):
    a, b = loaded("gen-a").slot, loaded("gen-b").slot
    p1, p2 = _ids(engine, PROMPTS[:2])
    solo2 = _greedy(engine, [p2], [b], steps=4)[0]
    first = engine.prefill([1], [p1], [a]).argmax(-1).tolist()
    for _ in range(3):
        first += engine.decode([first[-1]]).argmax(-1).tolist()
    second = engine.prefill([2], [p2], [b]).argmax(-1).tolist()
    for _ in range(3):
        logits = engine.decode([first[-1], second[-1]])
        first.append(int(logits[0].argmax()))
        second.append(int(logits[1].argmax()))
    assert second == solo2
    engine.release(1)
    engine.release(2)


def test_bottleneck_matches_hooked_hf_model(engine, hf_model, adapters, loaded):
    from safetensors.torch import load_file

    adapter = loaded("bneck")
    tensors = load_file(adapters["bneck"].path / "adapter_model.safetensors")
    prompt = _ids(engine, PROMPTS[:1])[0]

    def hook(prefix):
        def run(module, args, output):
            t = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            z = torch.nn.functional.gelu(output @ t["down.weight"].t() + t["down.bias"])
            return output + z @ t["up.weight"].t() + t["up.bias"]

        return run

    handles = []
    for i, layer in enumerate(hf_model.model.layers):
        handles.append(layer.self_attn.o_proj.register_forward_hook(hook(f"layers.{i}.attn_adapter.")))
        handles.append(layer.mlp.down_proj.register_forward_hook(hook(f"layers.{i}.mlp_adapter.")))
    try:
        with torch.inference_mode():
            reference = hf_model(torch.tensor([prompt])).logits[0, -1]
    finally:
        for handle in handles:
            handle.remove()
    logits = engine.prefill([1], [prompt], [adapter.slot])
    engine.release(1)
    torch.testing.assert_close(logits[0], reference, rtol=1e-4, atol=1e-4)


def test_classification_and_ner_heads_match_peft(engine, adapters, loaded, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    cls, ner = loaded("cls"), loaded("ner")
    prompts = _ids(engine, PROMPTS)
    hidden = engine.encode(prompts * 2, [cls.slot] * 3 + [ner.slot] * 3)
    cls_ref = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_base.path, num_labels=3),
        adapters["cls"].path,
    ).eval()
    ner_ref = PeftModel.from_pretrained(
        AutoModelForTokenClassification.from_pretrained(tiny_base.path, num_labels=5),
        adapters["ner"].path,
    ).eval()
    for i, prompt in enumerate(prompts):
        with torch.inference_mode():
            want_cls = cls_ref(input_ids=torch.tensor([prompt])).logits[0]
            want_ner = ner_ref(input_ids=torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(cls.head(hidden[i][-1]), want_cls, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ner.head(hidden[3 + i]), want_ner, rtol=1e-4, atol=1e-4)
    assert cls.labels == CLS_LABELS and ner.labels == NER_LABELS


def test_a_failed_load_frees_its_slot(engine, adapters, tmp_path):
    a = adapters["gen-a"]
    broken = tmp_path / "broken"
    shutil.copytree(a.path, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    free = engine.free_slots
    with pytest.raises(CorruptAdapterError):
        engine.load_adapter(a.key, broken, a.manifest)
    assert engine.free_slots == free
    adapter = engine.load_adapter(a.key, a.path, a.manifest)
    assert engine.free_slots == free - 1 and adapter.nbytes > 0 and adapter.task == "instruction"
    engine.unload_adapter(adapter)
    assert engine.free_slots == free


@pytest.mark.slow
def test_nf4_engine_loads_generates_and_is_smaller(tiny_base, adapters):
    from server.engine import Engine

    nf4 = Engine(tiny_base.path, base_name="tiny", quantize="nf4", max_adapters=2, max_rank=8,
                 max_batch_size=2, max_seq_len=64)  # fmt: skip
    full = Engine(tiny_base.path, base_name="tiny", quantize="none", max_adapters=2, max_rank=8,
                  max_batch_size=2, max_seq_len=64)  # fmt: skip
    assert nf4.memory_footprint < full.memory_footprint
    a = adapters["gen-a"]
    adapter = nf4.load_adapter(a.key, a.path, a.manifest)
    prompt = _ids(nf4, PROMPTS[:1])
    tokens = _greedy(nf4, prompt * 2, [adapter.slot, 0], steps=4)
    assert all(len(t) == 4 for t in tokens) and tokens[0] != tokens[1]

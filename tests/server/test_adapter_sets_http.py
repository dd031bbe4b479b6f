"""Weighted adapter sets through the real server (`python -m server`, tiny base): OpenAI and LoRAX/TGI.

A set's greedy tokens equal PEFT's `add_weighted_adapter(..., combination_type="cat")` for adapters of
equal and of different ranks, while plain-adapter and base requests run concurrently beside it; parts that
cannot combine, malformed sets and sets past `--max-rank` get their documented 4xx.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
import torch

from hub.bases import BaseInfo
from hub.store import LocalStore
from tests.server.conftest import make_bottleneck_adapter, make_peft_adapter
from tests.server.test_integration_server import launch, stop_server, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROMPT = "Adapters share one base model"
STEPS = 8
EQUAL = "tone@1*0.5+fact8*0.5"
DIFFERENT = "tone*0.6+facts@1*-0.4"


@dataclass
class Live:
    url: str
    registry: LocalStore

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)


@pytest.fixture(scope="module")
def live(tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("sets")
    store = LocalStore(root / "registry")
    make = functools.partial(make_peft_adapter, tiny_base)
    put = functools.partial(store.put, method="lora", base=tiny_base.spec, task="instruction")
    put(make(root / "src" / "tone", r=8, seed=21), name="tone")
    put(make(root / "src" / "facts", r=16, seed=22, targets=["q_proj", "v_proj", "down_proj"]), name="facts")
    put(make(root / "src" / "fact8", r=8, seed=23), name="fact8")
    store.put(make(root / "src" / "dora", r=4, seed=24, use_dora=True), name="dora", method="dora",
              base=tiny_base.spec, task="instruction")  # fmt: skip
    store.put(make_bottleneck_adapter(tiny_base, root / "src" / "bn", variant="pfeiffer", act="relu", size=8),
              name="bneck", method="bottleneck", base=tiny_base.spec, task="instruction")  # fmt: skip
    store.put(make(root / "src" / "cls", task_type="SEQ_CLS", num_labels=2, seed=25), name="cls",
              method="lora", base=tiny_base.spec, task="classification", labels=["a", "b"])  # fmt: skip
    log = root / "server.log"
    url, process = launch("tiny", store, log, "--quantize", "none", "--max-adapters", "6", "--max-rank", "24",
                          "--max-batch-size", "8")  # fmt: skip
    try:
        wait_ready(url, process, log)
        yield Live(url, store)
    finally:
        stop_server(process)


def _peft_tokens(base: BaseInfo, store: LocalStore, spec: list[tuple[str, float]] | None) -> list[int]:
    """Greedy tokens of PEFT's cat-combined adapter (or of the base when `spec` is None)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base.path)
    if spec is not None:
        names = [n for n, _ in spec]
        model = PeftModel.from_pretrained(model, store.get(names[0]).path, adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(store.get(name).path, adapter_name=name)
        if len(spec) > 1 or spec[0][1] != 1.0:
            model.add_weighted_adapter(names, [w for _, w in spec], "mix", combination_type="cat")
            model.set_adapter("mix")
    model.eval()
    seq = AutoTokenizer.from_pretrained(base.path)(PROMPT)["input_ids"]
    out = []
    with torch.inference_mode():
        for _ in range(STEPS):
            out.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
            seq.append(out[-1])
    return out


def _generate(live: Live, adapter_id: str | None) -> httpx.Response:
    params = {"max_new_tokens": STEPS, "details": True, "ignore_eos_token": True}
    if adapter_id is not None:
        params["adapter_id"] = adapter_id
    with live.client() as client:
        return client.post("/generate", json={"inputs": PROMPT, "parameters": params})


def _complete(live: Live, model: str) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": STEPS, "temperature": 0, "ignore_eos": True}
    with live.client() as client:
        return client.post("/v1/completions", json=body)


def _tokens(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def test_sets_equal_peft_cat_beside_plain_requests(live: Live, tiny_base: BaseInfo) -> None:
    want = {
        EQUAL: _peft_tokens(tiny_base, live.registry, [("tone", 0.5), ("fact8", 0.5)]),
        DIFFERENT: _peft_tokens(tiny_base, live.registry, [("tone", 0.6), ("facts", -0.4)]),
        "tone": _peft_tokens(tiny_base, live.registry, [("tone", 1.0)]),
        None: _peft_tokens(tiny_base, live.registry, None),
    }
    assert len({tuple(t) for t in want.values()}) == 4, "each set must change the output"
    calls = [("lorax", EQUAL), ("lorax", DIFFERENT), ("lorax", "tone"), ("lorax", None),
             ("openai", EQUAL), ("openai", DIFFERENT), ("openai", "tone"), ("openai", "tiny")]  # fmt: skip
    with ThreadPoolExecutor(len(calls)) as pool:  # concurrent: the sets share batches with plain rows
        answers = list(pool.map(lambda c: _generate(live, c[1]) if c[0] == "lorax" else _complete(live, c[1]),
                                calls))  # fmt: skip
    texts = {}
    for (api, model), answer in zip(calls, answers, strict=True):
        assert answer.status_code == 200, (api, model, answer.text)
        if api == "lorax":
            assert _tokens(answer) == want[model], model
            texts[model or "tiny"] = answer.json()["generated_text"]
    for (api, model), answer in zip(calls, answers, strict=True):
        if api == "openai":
            assert answer.json()["choices"][0]["text"] == texts[model], model
    again = _complete(live, "fact8@1*0.5+tone*0.5")  # the same versions and weights: one cached adapter
    assert again.json()["choices"][0]["text"] == texts[EQUAL]
    with live.client() as client:
        metrics = client.get("/metrics").text
    assert 'adapter="fact8@1+tone@1"' in metrics, "sets are labelled by their parts, without weights"


@pytest.mark.parametrize(
    ("model", "status", "code", "message"),
    [
        ("tone+dora", 422, "not_combinable", "dora@1 is a dora adapter"),
        ("tone*2+bneck", 422, "not_combinable", "bneck@1 is a bottleneck adapter"),
        ("tone+cls", 400, "wrong_task", "classification"),
        ("tone+nosuch", 404, "adapter_not_found", "nosuch"),
        ("tone*abc+facts", 400, "invalid_reference", "not a decimal number"),
        ("+".join(["tone"] * 9), 400, "invalid_reference", "at most 8"),
        (
            "tone+facts+fact8",
            400,
            "adapter_set_too_large",
            "8 + 16 + 8 = 32 in model.layers.0.mlp.down_proj",
        ),
    ],
)
def test_sets_that_cannot_be_served_get_a_clear_4xx(live: Live, model: str, status: int, code: str,
                                                    message: str) -> None:  # fmt: skip
    for answer in (_complete(live, model), _generate(live, model)):
        assert answer.status_code == status, answer.text
        error = answer.json()["error"]
        assert error["code"] == code and message in error["message"], error
    if code == "adapter_set_too_large":
        assert "--max-rank 24" in error["message"] and "--max-rank 32 or more" in error["message"]

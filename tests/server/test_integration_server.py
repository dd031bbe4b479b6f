"""The real server end to end: `python -m server` on 127.0.0.1, the tiny base, PEFT adapters made here.

Checked with real clients (`openai`, `text-generation`, `lorax-client`, `httpx`): completions and chat,
streamed and not, per adapter; task results equal plain `PeftModel.from_pretrained`; mixed-adapter
concurrent requests equal their solo greedy outputs; every error status; API keys; metrics; and `--quantize
nf4` serving with a smaller footprint than fp32. One server per configuration, started once for the module.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hub.bases import BaseInfo
from hub.manifest import BaseSpec
from hub.store import LocalStore
from tests.server.conftest import CLS_LABELS, NER_LABELS, make_peft_adapter

pytestmark = [pytest.mark.slow, pytest.mark.network, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
KEY = "integration-key"
MAX_NEW_TOKENS = 48
PROMPT = "The adapter dock serves"
OTHER_BASE = BaseSpec("small", "sha256:" + "0" * 64)


@dataclass
class Live:
    """A running server process."""

    url: str
    process: subprocess.Popen
    log: Path
    registry: LocalStore
    adapters: dict[str, Path]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}"}

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=60, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(base: str, registry: LocalStore, log: Path, *extra: str) -> tuple[str, subprocess.Popen]:
    """Start `python -m server` without waiting for it."""
    port = free_port()
    command = [
        sys.executable, "-m", "server",
        "--base", base, "--registry", str(registry.root), "--port", str(port),
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--max-input-tokens", "256",
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    return f"http://127.0.0.1:{port}", process


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 150) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).json().get("ready"):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_server(process)
    raise AssertionError(f"server did not become ready:\n{log.read_text()[-4000:]}")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


@pytest.fixture(scope="module")
def live(tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """The server, started once its preloaded adapter exists; other adapters are made while it boots."""
    root = tmp_path_factory.mktemp("live")
    store = LocalStore(root / "registry")
    spec = tiny_base.spec
    src = root / "src"
    make = functools.partial(make_peft_adapter, tiny_base)
    put = functools.partial(store.put, method="lora", base=spec)
    folders = {"gen-a": make(src / "gen-a", r=8, seed=11)}
    put(folders["gen-a"], name="gen-a", task="instruction", tags=["prod"])
    log = root / "server.log"
    url, process = launch(
        "tiny", store, log,
        "--quantize", "none", "--api-key", KEY, "--max-adapters", "4", "--max-batch-size", "4",
        "--max-queue", "8", "--max-body-bytes", "65536", "--preload", "gen-a@prod",
    )  # fmt: skip
    try:
        folders["gen-b"] = make(src / "gen-b", r=4, seed=12, targets=["q_proj", "v_proj"])
        folders["cls"] = make(src / "cls", task_type="SEQ_CLS", num_labels=3, seed=13)
        folders["ner"] = make(src / "ner", task_type="TOKEN_CLS", num_labels=5, seed=14)
        folders["reward"] = make(src / "rw", task_type="SEQ_CLS", num_labels=1, seed=15)
        put(folders["gen-b"], name="gen-b", task="dpo")
        put(folders["cls"], name="cls", task="classification", labels=CLS_LABELS)
        put(folders["ner"], name="ner", task="ner", labels=NER_LABELS)
        put(folders["reward"], name="reward", task="reward")
        store.put(folders["gen-a"], name="foreign", task="instruction", method="lora", base=OTHER_BASE)
        put(folders["gen-a"], name="corrupt", task="instruction")
        (store.get("corrupt", verify=False).path / "adapter_model.safetensors").write_bytes(b"\0" * 64)
        full = root / "full"
        shutil.copytree(tiny_base.path, full)
        store.put(full, name="merged", task="instruction", method="full", base=spec, kind="model")
        wait_ready(url, process, log)
        yield Live(url, process, log, store, folders)
    finally:
        stop_server(process)


def openai_client(live: Live):
    from openai import OpenAI

    return OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(live: Live, model: str, prompt: str = PROMPT, max_tokens: int = 12) -> str:
    response = openai_client(live).completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0
    )
    return response.choices[0].text


# ---- generation -------------------------------------------------------------------------------
def test_completions_and_chat_per_adapter_streamed_and_not(live: Live, tiny_base: BaseInfo):
    client = openai_client(live)
    outputs = {}
    for model in ("tiny", "gen-a", "gen-a@prod", "gen-b@1"):
        whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
        served = model if model == "tiny" else model.split("@")[0] + "@1"  # the immutable version
        assert whole.model == served and whole.usage.completion_tokens >= 1
        streamed = client.completions.create(
            model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True
        )
        assert "".join(chunk.choices[0].text for chunk in streamed) == whole.choices[0].text
        outputs[model] = whole.choices[0].text

        messages = [{"role": "user", "content": "Say something."}]
        chat = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
        assert chat.choices[0].message.role == "assistant"
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == chat.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert outputs["gen-a"] == outputs["gen-a@prod"]
    assert len({outputs["tiny"], outputs["gen-a"], outputs["gen-b@1"]}) == 3


def test_greedy_output_equals_peft_generate(live: Live, tiny_base: BaseInfo):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base.path)
    base = AutoModelForCausalLM.from_pretrained(tiny_base.path)
    model = PeftModel.from_pretrained(base, live.adapters["gen-a"]).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
    expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert greedy(live, "gen-a", max_tokens=10) == expected


def test_mixed_adapter_concurrent_requests_equal_solo_greedy(live: Live, tiny_base: BaseInfo):
    jobs = [(model, prompt) for model in ("gen-a", "gen-b", "tiny") for prompt in ("Hello", PROMPT)]
    solo = {job: greedy(live, *job, max_tokens=16) for job in jobs}
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: greedy(live, *job, max_tokens=16), jobs))
    assert together == [solo[job] for job in jobs]


def test_text_generation_and_lorax_clients(live: Live, tiny_base: BaseInfo):
    from lorax import Client as LoraxClient
    from text_generation import Client as TgiClient

    tgi = TgiClient(live.url, headers=live.headers(), timeout=60)
    base_text = greedy(live, "tiny", max_tokens=10)
    response = tgi.generate(PROMPT, max_new_tokens=10)
    assert response.generated_text == base_text
    assert response.details.generated_tokens == len(response.details.tokens) >= 1
    streamed = list(tgi.generate_stream(PROMPT, max_new_tokens=10))
    assert "".join(r.token.text for r in streamed) == base_text == streamed[-1].generated_text

    lorax = LoraxClient(live.url, headers=live.headers(), timeout=60)
    adapter_text = greedy(live, "gen-b", max_tokens=10)
    answer = lorax.generate(PROMPT, adapter_id="gen-b", adapter_source="local", max_new_tokens=10)
    assert answer.generated_text == adapter_text
    assert answer.details.generated_tokens == len(answer.details.tokens)
    assert all(t.logprob <= 0 for t in answer.details.tokens)
    streamed = list(lorax.generate_stream(PROMPT, adapter_id="gen-b", max_new_tokens=10))
    assert "".join(r.token.text for r in streamed) == adapter_text == streamed[-1].generated_text
    assert all(r.token.logprob <= 0 for r in streamed)


# ---- tasks ------------------------------------------------------------------------------------
def test_classification_ner_and_reward_equal_peft(live: Live, tiny_base: BaseInfo):
    import torch
    from peft import PeftModel
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
    )

    from server.heads import bio_entities

    tokenizer = AutoTokenizer.from_pretrained(tiny_base.path)
    texts = ["I loved this film", "Anna lives in Paris with Bob"]
    with live.client() as client:
        classified = client.post("/v1/classify", json={"adapter": "cls", "inputs": texts}).json()["data"]
        entities = client.post("/v1/ner", json={"adapter": "ner", "inputs": texts}).json()["data"]
        pairs = [{"prompt": "Be kind.", "response": "Sure, gladly."}, {"prompt": "Hi", "response": "Go away"}]
        rewards = client.post("/v1/score", json={"adapter": "reward", "inputs": pairs}).json()["data"]

    cls_model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_base.path, num_labels=3), live.adapters["cls"]
    ).eval()
    ner_model = PeftModel.from_pretrained(
        AutoModelForTokenClassification.from_pretrained(tiny_base.path, num_labels=5), live.adapters["ner"]
    ).eval()
    rw_model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(tiny_base.path, num_labels=1),
        live.adapters["reward"],
    ).eval()
    with torch.no_grad():
        for text, got_cls, got_ner in zip(texts, classified, entities, strict=True):
            probs = torch.softmax(cls_model(**tokenizer(text, return_tensors="pt")).logits[0], -1).tolist()
            assert got_cls["label"] == CLS_LABELS[max(range(3), key=probs.__getitem__)]
            assert got_cls["scores"] == pytest.approx(dict(zip(CLS_LABELS, probs, strict=True)), abs=1e-4)
            enc = tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
            offsets = enc.pop("offset_mapping")[0].tolist()
            expected = bio_entities(text, ner_model(**enc).logits[0], offsets, NER_LABELS)
            assert [(e["type"], e["start"], e["end"]) for e in got_ner["entities"]] == [
                (e["type"], e["start"], e["end"]) for e in expected
            ]
            assert [e["score"] for e in got_ner["entities"]] == pytest.approx(
                [e["score"] for e in expected], abs=1e-4
            )
        for pair, got in zip(pairs, rewards, strict=True):
            messages = [
                {"role": "user", "content": pair["prompt"]},
                {"role": "assistant", "content": pair["response"]},
            ]
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            assert got["score"] == pytest.approx(float(rw_model(**ids).logits[0, 0]), abs=1e-4)


# ---- management, errors, auth, metrics --------------------------------------------------------
def test_every_error_status(live: Live):
    def post(client: httpx.Client, path: str, body: dict) -> httpx.Response:
        return client.post(path, json=body)

    with live.client() as client:
        cases = [
            ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "adapter_not_found"),
            ("/v1/completions", {"model": "foreign", "prompt": "x"}, 409, "base_mismatch"),
            ("/v1/completions", {"model": "merged", "prompt": "x"}, 409, "adapter_is_full_model"),
            ("/v1/completions", {"model": "cls", "prompt": "x"}, 400, "wrong_task"),
            ("/v1/classify", {"adapter": "gen-a", "inputs": "x"}, 400, "wrong_task"),
            ("/v1/completions", {"model": "corrupt", "prompt": "x"}, 422, "corrupt_adapter"),
            ("/v1/completions", {"model": "gen-a", "prompt": "x", "max_tokens": 999}, 400, "input_too_long"),
            ("/v1/completions", {"model": "gen-a", "prompt": "word " * 400}, 400, "input_too_long"),
            ("/v1/completions", {"model": "gen-a", "prompt": "x", "top_p": 0}, 422, "invalid_body"),
            ("/generate", {"inputs": "x", "parameters": {"adapter_id": "/etc/passwd"}},
             400, "invalid_reference"),
            ("/generate", {"inputs": "x", "parameters": {"adapter_id": "gen-a", "adapter_source": "hub"}},
             400, "hub_not_configured"),
        ]  # fmt: skip
        for path, body, status, code in cases:
            response = post(client, path, body)
            assert response.status_code == status, (body, response.text)
            assert response.json()["error"]["code"] == code
        assert (
            "--base registry:merged@1"
            in post(client, "/v1/completions", cases[2][1]).json()["error"]["message"]
        )
        assert "POST /v1/classify" in post(client, "/v1/completions", cases[3][1]).json()["error"]["message"]
        assert (
            client.post(
                "/v1/completions", content=b"{oops", headers={"content-type": "application/json"}
            ).status_code
            == 422
        )
        too_big = client.post("/v1/completions", json={"model": "gen-a", "prompt": "x" * 70_000})
        assert too_big.status_code == 413
        listed = {a["id"]: a for a in client.get("/v1/adapters").json()["data"]}
        assert not listed["corrupt@1"]["loaded"]  # a corrupt adapter is never cached
        assert listed["gen-a@1"]["pinned"]  # --preload pins
        assert (
            post(client, "/v1/completions", {"model": "gen-b", "prompt": "x", "max_tokens": 2}).status_code
            == 200
        )


def test_queue_full_answers_503_with_retry_after(live: Live):
    body = {"model": "gen-a", "prompt": PROMPT, "max_tokens": 32, "temperature": 0, "ignore_eos": True}

    def send(_: int) -> httpx.Response:
        with live.client() as client:
            return client.post("/v1/completions", json=body)

    with ThreadPoolExecutor(24) as pool:  # 4 rows run, 8 may wait: the rest must be turned away
        responses = list(pool.map(send, range(24)))
    statuses = [r.status_code for r in responses]
    assert 200 in statuses and 503 in statuses, statuses
    full = next(r for r in responses if r.status_code == 503)
    assert full.headers["retry-after"] and full.json()["error"]["code"] == "queue_full"


def test_api_key_management_and_metrics(live: Live):
    assert httpx.get(f"{live.url}/health").status_code == 200
    for path in ("/v1/models", "/metrics", "/ready"):
        assert httpx.get(f"{live.url}{path}").status_code == 401
    assert httpx.get(f"{live.url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    with live.client() as client:
        ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert {"gen-a", "gen-a@1", "gen-b", "gen-b@1"} <= set(ids) and "cls" not in ids
        assert client.post("/v1/adapters/load", json={"adapter": "reward"}).json()["loaded"]
        assert client.post("/v1/adapters/cls/pin").json()["pinned"]
        assert client.post("/v1/adapters/cls/unpin").json()["unpinned"] == ["cls@1"]
        assert client.delete("/v1/adapters/reward@1").json()["unloaded"] == ["reward@1"]
        greedy(live, "gen-a", max_tokens=3)
        metrics = client.get("/metrics").text
    for name in (
        'adapterdock_requests_total{adapter="gen-a@1",endpoint="/v1/completions",status="200"}',
        "adapterdock_request_duration_seconds_bucket",
        'adapterdock_prompt_tokens_total{adapter="gen-a@1"}',
        'adapterdock_generated_tokens_total{adapter="gen-a@1"}',
        "adapterdock_adapter_cache_hits_total",
        "adapterdock_adapter_cache_misses_total",
        "adapterdock_adapter_cache_evictions_total",
        "adapterdock_adapter_load_seconds_total",
        "adapterdock_queue_depth",
        "adapterdock_batch_size",
        "adapterdock_base_memory_bytes",
    ):
        assert name in metrics, name


def test_nf4_serves_with_a_smaller_footprint(live: Live, caplog: pytest.LogCaptureFixture):
    """`--quantize nf4` flags -> the real app in this process (a second server process would double the
    start-up time); its footprint is logged and below the fp32 server's."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.cli import build_parser, config_from_args

    with live.client() as client:
        fp32 = client.get("/ready").json()["memory_footprint"]
    args = build_parser().parse_args(["--quantize", "nf4", "--registry", str(live.registry.root),
                                      "--max-adapters", "2", "--max-new-tokens", "8"])  # fmt: skip
    caplog.set_level(logging.INFO, logger="server.app")
    with TestClient(create_app(config_from_args(args))) as client:
        ready = client.get("/ready").json()
        body = {"model": "gen-a", "prompt": PROMPT, "max_tokens": 4}
        response = client.post("/v1/completions", json=body)
    assert ready["quantize"] == "nf4" and 0 < ready["memory_footprint"] < fp32
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
    lines = [r.getMessage() for r in caplog.records if "memory footprint" in r.getMessage()]
    assert lines and "quantize=nf4" in lines[0]
    assert f"memory footprint {ready['memory_footprint']} bytes" in lines[0]


def test_vllm_extras_min_tokens_and_ignore_eos(live: Live):
    """Last on purpose: it exercises eos masking in the scheduler's sampling path."""
    client = openai_client(live).with_options(timeout=20)
    for extra in ({"min_tokens": 6}, {"ignore_eos": True}):
        response = client.completions.create(
            model="gen-b", prompt=PROMPT, max_tokens=6, temperature=0, extra_body=extra
        )
        assert response.usage.completion_tokens == 6, extra
        assert response.choices[0].finish_reason == "length"

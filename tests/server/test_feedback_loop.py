"""The human feedback loop end to end: serve -> pairs -> judgements -> export -> DPO -> serve the result.

A real server process (`python -m server`) serves the tiny base and a LoRA instruction adapter on 127.0.0.1
with an API key and a rater token. Pairs are made over HTTP (two samples of the adapter, and adapter vs
base), two raters judge them over HTTP through the shuffled left/right view, `adapterdock feedback export`
writes the JSONL, `trainers.dpo` trains a DPO adapter on it (starting from the served adapter), and the same
running server serves the new adapter and pairs it against the old one: the next round of the loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hub.bases import BaseInfo
from hub.store import LocalStore
from server.feedback.cli import main as feedback_main
from tests.server.conftest import make_peft_adapter
from tests.server.test_integration_server import free_port, stop_server, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.network, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
API_KEY = "loop-admin"
RATER_TOKENS = {"ann": "loop-rater-ann", "bob": "loop-rater-bob"}
"""One token per rater (`--rater-tokens-file`): a rater's identity is their token."""
PROMPTS = ["Name a fruit.", "Say hello.", "Count to three.", "What is rain?", "Pick a colour.", "Greet me."]


@dataclass
class Live:
    url: str
    registry: LocalStore
    log: Path

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)

    def rater(self, name: str = "ann") -> httpx.Client:
        token = RATER_TOKENS[name]
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


@pytest.fixture(scope="module")
def live(tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("feedback-loop")
    registry = LocalStore(root / "registry")
    port, log = free_port(), root / "server.log"
    tokens = root / "raters.txt"
    tokens.write_text("# rater_id:token\n" + "".join(f"{r}:{t}\n" for r, t in RATER_TOKENS.items()))
    command = [
        sys.executable, "-m", "server",
        "--base", "tiny", "--quantize", "none", "--registry", str(registry.root), "--port", str(port),
        "--api-key", API_KEY, "--rater-tokens-file", str(tokens),
        "--max-new-tokens", "24", "--max-input-tokens", "256", "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        # The instruction adapter is made while the server starts; it is resolved per request.
        folder = make_peft_adapter(tiny_base, root / "src" / "chat", r=8, seed=21)
        registry.put(
            folder, name="chat", task="instruction", method="lora", base=tiny_base.spec, tags=["prod"]
        )
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, process, log)
        yield Live(url, registry, log)
    finally:
        stop_server(process)


def make_pairs(live: Live) -> list[dict]:
    made = []
    with live.admin() as client:
        for i, prompt in enumerate(PROMPTS):
            body = {"model": "chat@prod", "prompt": prompt, "max_tokens": 16, "temperature": 1.0, "seed": i}
            if i % 3 == 2:
                body["model_b"] = "tiny"  # one answer from the adapter, one from the bare base
            response = client.post("/v1/feedback/pairs", json=body)
            assert response.status_code == 200, response.text
            made.append(response.json())
    return made


def judge_all(live: Live, rater: str, tie_on: str | None = None) -> int:
    """Judge every pending pair as `rater` would: prefer the answer whose text sorts first."""
    judged = 0
    with live.rater(rater) as client:
        while (pair := client.get("/v1/feedback/next", params={"rater": rater}).json()["pair"]) is not None:
            choice = "left" if pair["left"] <= pair["right"] else "right"
            if pair["pair_id"] == tie_on:
                choice = "tie"
            body = {"pair_id": pair["pair_id"], "choice": choice, "rater": rater}
            answer = client.post("/v1/feedback", json=body)
            assert answer.status_code == 200 and answer.json()["status"] == "recorded", answer.text
            judged += 1
    return judged


def test_collect_export_train_serve(live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    # 1. Pairs through the generation path; the rater token cannot make them.
    made = make_pairs(live)
    models = [tuple(c["model"] for c in m["candidates"]) for m in made]
    assert models == [("chat@1", "chat@1"), ("chat@1", "chat@1"), ("chat@1", "tiny")] * 2
    assert all(c["text"] and c["finish_reason"] in ("stop", "length") for m in made for c in m["candidates"])
    assert made[0]["candidates"][0]["text"] != made[0]["candidates"][1]["text"]  # seeds 0 and 1
    with live.rater() as client:
        denied = client.post("/v1/feedback/pairs", json={"model": "chat", "prompt": "x"})
        assert denied.status_code == 401
        assert client.post("/v1/completions", json={"model": "chat", "prompt": "x"}).status_code == 401

    # 2. Two raters through the shuffled view; bob calls one pair a tie, which leaves it without majority.
    assert judge_all(live, "ann") == len(PROMPTS)
    assert judge_all(live, "bob", tie_on=made[0]["pair_id"]) == len(PROMPTS)
    with live.rater("bob") as client:
        progress = client.get("/v1/feedback/progress", params={"rater": "bob"}).json()
    assert progress | {"object": None} == {
        "object": None, "pairs": 6, "judgements": 12, "raters": 2, "rated": 6, "pending": 0,
    }  # fmt: skip

    # 3. Export: ann and bob agree (same text preferred) on every pair but the tied one.
    out = tmp_path / "pairs.jsonl"
    assert feedback_main(["export", "--registry", str(live.registry.root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    identical = sum(
        m["candidates"][0]["text"].strip() == m["candidates"][1]["text"].strip() for m in made[1:]
    )
    assert len(rows) == 5 - identical >= 2, printed
    assert "no majority 1" in printed and "pairwise over 6 pairs" in printed
    for row in rows:
        assert row["chosen"] < row["rejected"] and row["agreement"] == 1.0
        assert row["prompt"] in PROMPTS
    assert feedback_main(["stats", "--registry", str(live.registry.root), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["judgements"] == 12 and set(stats["models"]) == {"chat@1", "tiny"}

    # 4. DPO on the export, starting from the served adapter (which is also the frozen reference).
    from trainers import dpo

    config = dpo.Config(
        base="tiny", data=str(out), eval=str(out), name="chat-dpo", from_adapter="chat@prod",
        max_steps=2, batch_size=2, max_length=64, lr=1e-3, registry=str(live.registry.root),
        progress=False, cpu=True,
    )  # fmt: skip
    manifest = dpo.train(config)
    assert (manifest.ref, manifest.task) == ("chat-dpo@1", "dpo")
    assert manifest.trainer["from_adapter"] == "chat@prod"

    # 5. The running server serves the new adapter, and the next round pairs it against the old one.
    with live.admin() as client:
        listed = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert "chat-dpo@1" in listed
        body = {"model": "chat-dpo", "prompt": "Name a fruit.", "max_tokens": 8, "temperature": 0}
        completion = client.post("/v1/completions", json=body)
        assert completion.status_code == 200, completion.text
        assert completion.json()["choices"][0]["text"]
        chat = client.post(
            "/v1/chat/completions",
            json={"model": "chat-dpo@1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
        )
        assert chat.status_code == 200, chat.text
        rematch = client.post(
            "/v1/feedback/pairs",
            json={"model": "chat-dpo", "model_b": "chat@1", "prompt": "Say hello.", "max_tokens": 8},
        )
        assert rematch.status_code == 200, rematch.text
        assert [c["model"] for c in rematch.json()["candidates"]] == ["chat-dpo@1", "chat@1"]
    with live.rater() as client:
        assert client.get("/v1/feedback/progress", params={"rater": "ann"}).json()["pending"] == 1

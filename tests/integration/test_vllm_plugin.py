"""vLLM's CPU build serving registry adapters through our resolver plugin, against our own server.

One vLLM process (module fixture, fp32, tiny base) with `VLLM_PLUGINS=adapterdock` and a registry holding
two versions of a chat adapter (one tagged prod), a classification adapter and an adapter recorded for
another base; a third chat adapter is pushed to our hub service as `acme/chat`. Checks: greedy output
through vLLM equals `adapterdock serve`'s for the same adapter by `name@version`, by tag and pulled from the
hub as `acme/chat@1`; after the prod tag moves, vLLM keeps the version it resolved (as documented) while
our server follows; the other base, the classification adapter and a missing name get 404 with the
reason in vLLM's log, and vLLM keeps serving.

vLLM lives in its own venv (`.ci/vllm-venv` builds `.venv-vllm`; or set ADAPTERDOCK_VLLM_VENV); without
one the test is skipped. Startup takes 1-3 minutes on 2 cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hub.bases import BaseInfo
from hub.manifest import BaseSpec
from hub.remote import HubClient
from hub.store import LocalStore
from tests.hub.conftest import HubProcess, start_hub
from tests.server.conftest import make_peft_adapter
from tests.server.test_integration_server import free_port, launch, stop_server, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.network]

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("ADAPTERDOCK_VLLM_VENV") or REPO / ".venv-vllm")
PROMPT = "The weather today is"
STARTUP_S = 600
FOREIGN = BaseSpec("another-base", "sha256:" + "0" * 64)


def _vllm_python() -> Path:
    python = VENV / "bin" / "python"
    if not python.is_file():
        pytest.skip(
            f"no vLLM venv at {VENV} (build it with `bash .ci/vllm-venv`, or set ADAPTERDOCK_VLLM_VENV)"
        )
    check = (
        "import importlib.util as u, sys\n"
        "sys.exit(0 if u.find_spec('vllm') and u.find_spec('hub.vllm_plugin') else 1)"
    )
    if subprocess.run([str(python), "-c", check], cwd=REPO, timeout=60).returncode != 0:
        pytest.skip(f"{VENV} lacks vllm or adapterdock (run `bash .ci/vllm-venv`)")
    return python


@dataclass
class Servers:
    vllm: str
    vllm_log: Path
    ours: str
    base: BaseInfo
    store: LocalStore


@pytest.fixture(scope="module")
def servers(tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    python = _vllm_python()
    root = tmp_path_factory.mktemp("vllm-plugin")
    store = LocalStore(root / "registry")
    spec, src = tiny_base.spec, root / "src"
    store.put(make_peft_adapter(tiny_base, src / "v1", r=8, seed=21), name="chat", task="instruction",
              method="lora", base=spec)  # fmt: skip
    store.put(make_peft_adapter(tiny_base, src / "v2", r=8, seed=22), name="chat", task="instruction",
              method="lora", base=spec, tags=["prod"])  # fmt: skip
    store.put(make_peft_adapter(tiny_base, src / "cls", task_type="SEQ_CLS", num_labels=2, seed=23),
              name="cls", task="classification", method="lora", base=spec, labels=["neg", "pos"])  # fmt: skip
    store.put(src / "v1", name="foreign", task="instruction", method="lora", base=FOREIGN)
    # The hub copy is also registered locally as `hub-chat`, so our server can answer for the same weights.
    hub_made = store.put(make_peft_adapter(tiny_base, src / "hub", r=8, seed=24), name="hub-chat",
                         task="instruction", method="lora", base=spec)  # fmt: skip
    hub, processes = _start_hub(root, store, hub_made.ref), []
    try:
        vllm_url, vllm_log = f"http://127.0.0.1:{free_port()}", root / "vllm.log"
        processes.append(_start_vllm(python, tiny_base, store, hub, vllm_url, vllm_log))
        ours, proc = launch("tiny", store, root / "ours.log", "--quantize", "none")
        processes.append(proc)
        wait_ready(ours, proc, root / "ours.log", timeout=300)
        _wait_vllm(vllm_url, processes[0], vllm_log)
        yield Servers(vllm_url, vllm_log, ours, tiny_base, store)
    finally:
        for proc in reversed(processes):
            _stop_group(proc)
        hub.stop()


def _start_hub(root: Path, store: LocalStore, ref: str) -> HubProcess:
    hub = start_hub(root / "hub-root", token_file=None)
    with pytest.MonkeyPatch.context() as patch:  # huggingface_hub may talk to the loopback hub now
        from huggingface_hub import constants

        patch.setenv("HF_HUB_OFFLINE", "0")
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        HubClient(endpoint=hub.url).push(store, ref, "acme/chat")
    return hub


def _start_vllm(
    python: Path, base: BaseInfo, store: LocalStore, hub: HubProcess, url: str, log: Path
) -> subprocess.Popen:
    env = {
        **os.environ,
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_PLUGINS": "adapterdock",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "ADAPTERDOCK_REGISTRY": str(store.root),
        "ADAPTERDOCK_HUB": hub.url,
        "HF_HUB_OFFLINE": "0",  # for the plugin's pull from the loopback hub; the model is a local folder
        "HF_HUB_DISABLE_XET": "1",
        "PYTHONUNBUFFERED": "1",
        # The plugin's module from this checkout, whatever the venv's install of adapterdock points at
        # (an editable install made from another clone, or a stale copy).
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }
    env.pop("VIRTUAL_ENV", None)
    command = [
        str(python), "-m", "vllm.entrypoints.launchers.api_server.entry",
        "--model", str(base.path), "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
        "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "4", "--seed", "0",
        "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
    ]  # fmt: skip
    with open(log, "wb") as sink:
        return subprocess.Popen(command, cwd=log.parent, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def _wait_vllm(url: str, process: subprocess.Popen, log: Path) -> None:
    started = time.monotonic()
    while time.monotonic() - started < STARTUP_S:
        if process.poll() is not None:
            raise AssertionError(f"vLLM exited with {process.returncode}:\n{log.read_text()[-6000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                print(f"vLLM ready after {time.monotonic() - started:.0f} s")
                _check_plugin_registered(log)
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise AssertionError(f"vLLM not ready after {STARTUP_S} s:\n{log.read_text()[-6000:]}")


def _check_plugin_registered(log: Path) -> None:
    """Fail here, with vLLM's own words, when the resolver never registered (every later 404 says why)."""
    text = log.read_text(errors="replace")
    if "adapterdock: LoRA resolver registered" in text:
        return
    clues = [
        line
        for line in text.splitlines()
        if any(word in line for word in ("plugin", "adapterdock", "hub.", "Error", "Traceback"))
    ]
    raise AssertionError(
        "vLLM started without adapterdock's LoRA resolver. Log lines about plugins:\n"
        + "\n".join(clues[-60:])
        + f"\n--- log head ---\n{text[:3000]}"
    )


def _stop_group(process: subprocess.Popen) -> None:
    """vLLM runs its engine in child processes: stop the whole session it leads (ours has one process)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        stop_server(process)
        return
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def complete(url: str, model: str) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=180)


def text_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_vllm_gives_our_servers_greedy_output_for_registry_adapters(servers: Servers) -> None:
    base = text_of(complete(servers.vllm, str(servers.base.path)))
    answers = {}
    for ours, theirs in [("chat@1", "chat@1"), ("chat@prod", "chat@prod"), ("hub-chat@1", "acme/chat@1")]:
        expected = text_of(complete(servers.ours, ours))
        answers[theirs] = text_of(complete(servers.vllm, theirs))
        assert answers[theirs] == expected, (ours, theirs)
    assert len({base, *answers.values()}) == 4  # each adapter really changes the output
    pulled = servers.store.get("acme/chat").manifest  # pulled from the hub by the plugin inside vLLM
    assert pulled.files == servers.store.get("hub-chat@1").manifest.files
    assert pulled.base.fingerprint == servers.base.fingerprint
    # A moved tag: vLLM keeps what it resolved under that name (docs/scaling.md); our server follows the tag.
    servers.store.tag("chat@1", "prod")
    assert text_of(complete(servers.vllm, "chat@prod")) == answers["chat@prod"]
    assert text_of(complete(servers.ours, "chat@prod")) == answers["chat@1"]


def test_vllm_refuses_what_it_cannot_serve_and_keeps_serving(servers: Servers) -> None:
    for model in ("foreign@1", "cls", "missing@1"):
        response = complete(servers.vllm, model)
        assert response.status_code == 404, (model, response.text)
    log = servers.vllm_log.read_text(errors="replace")
    assert "refused 'foreign@1'" in log and "was trained on base another-base" in log
    assert "refused 'cls'" in log and "classification adapter" in log and "adapterdock serve" in log
    assert "'missing@1' is not a registry adapter" in log
    text_of(complete(servers.vllm, "chat@1"))

"""Take docs/feedback.png: the rating page showing real answer pairs made by the server on the real base.

Starts `adapterdock serve --base smollm2-135m` on 127.0.0.1 with an API key and a rater token, asks it for
answer pairs (a chat adapter against the base alone, the same seed) through `POST /v1/feedback/pairs`, opens
`/feedback` in headless Debian Chromium (driven by Playwright's Python package; no browser download), signs
in as a rater and saves a screenshot of the first pair. Needs a chat adapter for that base in the registry:
by default `quickstart-chat`, which `adapterdock quickstart` trains.

Run: `python examples/feedback_screenshot.py [--registry adapters] [--adapter quickstart-chat]
[--out docs/feedback.png]`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
PROMPTS = [
    "What is the capital of Canada?",
    "What is the opposite of early?",
    "Name a fruit that is yellow when ripe.",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: argparse.Namespace, port: int, api_key: str, token: str, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "server", "--base", args.base, "--registry", str(args.registry),
               "--port", str(port), "--api-key", api_key, "--rater-token", token,
               "--feedback-db", str(log.with_suffix(".sqlite")), "--max-adapters", "2",
               "--max-rank", "16"]  # fmt: skip
    process = subprocess.Popen(command, cwd=REPO, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json().get("ready"):
                return process
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    process.kill()
    raise SystemExit(f"the server did not become ready; see {log}")


def make_pairs(url: str, api_key: str, adapter: str, base: str) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    for prompt in PROMPTS:
        body = {"model": adapter, "model_b": base, "prompt": prompt, "seed": 7, "temperature": 0.7,
                "max_tokens": 40}  # fmt: skip
        response = httpx.post(f"{url}/v1/feedback/pairs", json=body, headers=headers, timeout=300)
        response.raise_for_status()
        print(prompt, "->", [c["text"] for c in response.json()["candidates"]])


def screenshot(url: str, token: str, out: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            credentials = {"username": "rater", "password": token}
            page = browser.new_page(viewport={"width": 1200, "height": 720}, http_credentials=credentials)
            page.goto(f"{url}/feedback")
            page.fill("#rater", "rater")
            page.fill("#token", token)
            page.click("#start")
            expect(page.locator("#left")).not_to_be_empty()
            page.mouse.move(0, 0)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--registry", type=Path, default=REPO / "adapters")
    parser.add_argument("--adapter", default="quickstart-chat")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "feedback.png")
    args = parser.parse_args()
    if not os.path.exists(CHROMIUM):
        raise SystemExit(f"{CHROMIUM} is absent: run .ci/system-deps (Debian's chromium)")
    api_key, token, port = secrets.token_hex(16), secrets.token_hex(16), free_port()
    with tempfile.TemporaryDirectory(prefix="feedback-shot-") as tmp:
        server = start(args, port, api_key, token, Path(tmp) / "server.log")
        try:
            url = f"http://127.0.0.1:{port}"
            make_pairs(url, api_key, args.adapter, args.base)
            screenshot(url, token, args.out)
        finally:
            server.terminate()
            server.wait(60)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

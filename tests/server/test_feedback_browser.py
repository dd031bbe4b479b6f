"""The rating page in a real browser: headless Debian Chromium driven by Playwright's Python package.

The app (fake engine, real feedback routes and database) runs under uvicorn on 127.0.0.1 with an API key
and a separate rater token. The browser loads /feedback, is refused without the token, signs in with it,
judges pairs by click and by key, and each judgement is checked in the database, mapped back from
left/right to a/b, and the page is screenshotted (docs/feedback.png, with real pairs from the real base, is
made by examples/feedback_screenshot.py instead). Skips only when
/usr/bin/chromium is absent (`.ci/system-deps` installs it); never runs `playwright install`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.store import LocalStore
from server.feedback.records import Pair
from server.feedback.store import FeedbackStore
from tests.server.fakes import FakeServer, register

pytestmark = [pytest.mark.slow, pytest.mark.network, pytest.mark.timeout(120)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
API_KEY, RATER_TOKEN = "admin-key", "rater-secret"
PAIRS = [
    (
        "Explain in two sentences why the sky is blue.",
        "Sunlight scatters off the molecules in the air, and blue light, with its short wavelength, "
        "scatters far more than red. So wherever you look away from the sun, you see scattered blue light.",
        "The sky is blue because it reflects the colour of the oceans, which cover most of the planet.",
    ),
    (
        [
            {"role": "system", "content": "You answer questions about HTML."},
            {"role": "user", "content": "How do I make text bold?"},
        ],
        "Wrap it in <b>…</b> or, for important text, <strong>…</strong>.",
        "Use CSS: font-weight: bold.",
    ),
]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, FeedbackStore, list[Pair]]]:
    """The app served by uvicorn in a thread; yields (url, feedback store, pairs in rating order)."""
    import uvicorn

    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is absent: install Debian's chromium (.ci/system-deps does) to run this test"
        )
    pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extras have it)")
    root = tmp_path_factory.mktemp("feedback-browser")
    registry = LocalStore(root / "registry")
    register(registry, "chat")
    db_path = root / "feedback.sqlite"
    fake = FakeServer(registry, api_key=API_KEY, rater_tokens={"alice": RATER_TOKEN}, feedback_db=db_path)
    store = FeedbackStore(db_path)
    pairs = [
        store.add_pair(prompt, a, b, adapter_a="chat", version_a=1, adapter_b="tiny", version_b=None)
        for prompt, a, b in PAIRS
    ]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started, "uvicorn did not start"
    try:
        import httpx

        made = httpx.post(
            f"http://127.0.0.1:{port}/v1/feedback/pairs",
            json={"model": "chat", "prompt": "Say hi.", "max_tokens": 24},
            headers={"Authorization": f"Bearer {API_KEY}"},
            timeout=30,
        )  # a third pair, generated through the API
        assert made.status_code == 200, made.text
        pairs.append(store.get_pair(made.json()["pair_id"]))
        yield f"http://127.0.0.1:{port}", store, pairs
    finally:
        uv.should_exit = True
        thread.join(15)


def judgement(store: FeedbackStore, pair: Pair, rater: str):
    found = [j for j in store.judgements(pair.pair_id) if j.rater == rater]
    return found[0] if found else None


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the database")


def test_rate_pairs_in_chromium(live: tuple[str, FeedbackStore, list[Pair]], tmp_path: Path):
    from playwright.sync_api import expect, sync_playwright

    url, store, pairs = live
    shot = tmp_path / "feedback.png"
    rater = "alice"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            # The page itself needs a credential: a browser answers its Basic challenge with the token.
            credentials = {"username": rater, "password": RATER_TOKEN}
            page = browser.new_page(viewport={"width": 1200, "height": 720}, http_credentials=credentials)
            problems: list[str] = []
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(f"{url}/feedback")

            # Without the token the server refuses, and the page asks for it.
            expect(page.locator("#login")).to_be_visible()
            page.fill("#rater", rater)
            page.click("#start")
            expect(page.locator("#login-error")).to_have_text("This server needs a rater token.")
            page.fill("#token", "wrong")
            page.click("#start")
            expect(page.locator("#login-error")).to_contain_text("refused this token")
            page.fill("#token", RATER_TOKEN)
            page.click("#start")

            # The first pair, shuffled for alice; which model made which is nowhere on the page.
            left, right = pairs[0].view(rater)
            expect(page.locator("#left")).to_have_text(left)
            expect(page.locator("#right")).to_have_text(right)
            expect(page.locator("#prompt")).to_contain_text(PAIRS[0][0])
            expect(page.locator("#progress")).to_have_text("rated 0 · pending 3")
            assert "tiny" not in page.content() and "chat" not in page.inner_text("body")
            page.mouse.move(0, 0)  # no hover highlight in the picture
            page.screenshot(path=str(shot), full_page=True)

            # A click: "left is better" is stored as whichever of a/b was shown on the left.
            page.click("#choose-left")
            first = wait_for(lambda: judgement(store, pairs[0], rater))
            assert first.choice == ("b" if pairs[0].swapped_for(rater) else "a") and first.swapped is not None
            expect(page.locator("#progress")).to_have_text("rated 1 · pending 2")

            # The next pair: HTML in an answer is shown as text; key 2 picks the right answer.
            left, right = pairs[1].view(rater)
            expect(page.locator("#right")).to_have_text(right)
            assert "<b>…</b>" in page.inner_text(".answers")
            page.keyboard.press("2")
            second = wait_for(lambda: judgement(store, pairs[1], rater))
            assert second.choice == ("a" if pairs[1].swapped_for(rater) else "b")

            # Typing 3 in the comment box is text, not a choice; then the tie button sends both.
            expect(page.locator("#progress")).to_have_text("rated 2 · pending 1")
            page.fill("#comment", "")
            page.type("#comment", "both say hi 3")
            assert judgement(store, pairs[2], rater) is None
            page.click("#choose-tie")
            third = wait_for(lambda: judgement(store, pairs[2], rater))
            assert (third.choice, third.comment) == ("tie", "both say hi 3")
            expect(page.locator("#done")).to_be_visible()
            expect(page.locator("#progress")).to_have_text("rated 3 · pending 0")
            # Only the two refused sign-ins may have logged (as failed 401 fetches); no CSP or script errors.
            assert [p for p in problems if "401" not in p] == [], problems
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert store.progress(rater) == {"pairs": 3, "judgements": 3, "raters": 1, "rated": 3, "pending": 0}

"""Browsing: `GET /api/adapters?task=&base=` (JSON) and `GET /` (a small HTML page with the adapters' cards).

An adapter is a repo whose `main` holds a valid adapterdock `manifest.json`; other repos are hosted but not
listed here. Private repos are listed only to callers who may read them. One malformed repo (a manifest that
does not validate or serialize, hostile card metadata, a damaged blob) is skipped and logged: it never
fails the listing or the page for everyone else.
Boundary: read-only views over storage and `hub.service.catalog`.
"""

from __future__ import annotations

import html
import json
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from hub.manifest import TASKS
from hub.service.auth import Grant
from hub.service.catalog import adapter_summary, read_card
from hub.service.deps import Caller, ServiceState, State, base_url
from hub.service.errors import RevisionNotFoundError

router = APIRouter()
logger = logging.getLogger(__name__)


def find_adapters(
    state: ServiceState, caller: Grant | None, task: str | None = None, base: str | None = None
) -> list[tuple[dict[str, Any], str]]:
    """`(summary, card body)` of each readable adapter repo matching `task` and `base` (fingerprint/name)."""
    found = []
    for repo in state.storage.list_repos():
        if repo.private and (caller is None or not caller.can_read(repo.repo_id)):
            continue
        try:
            entry = _adapter_entry(state, repo.repo_id, repo.private, task, base)
        except Exception:  # one bad repo is skipped, never the whole listing
            logger.exception("skipping repo %s in the adapter listing", repo.repo_id)
            continue
        if entry is not None:
            found.append(entry)
    return found


def _adapter_entry(
    state: ServiceState, repo_id: str, private: bool, task: str | None, base: str | None
) -> tuple[dict[str, Any], str] | None:
    """One repo's `(summary, card body)`, None when it is not an adapter or does not match the filters.

    Raises:
        Whatever a malformed repo makes parsing or rendering raise; `find_adapters` skips it.
    """
    try:
        commit = state.storage.resolve(repo_id, "main")
    except RevisionNotFoundError:
        return None
    card = read_card(state.storage, state.storage.files(commit.oid))
    manifest = card.manifest
    if manifest is None:
        return None
    if task and manifest.task != task:
        return None
    if base and base not in (manifest.base.fingerprint, manifest.base.name_or_path):
        return None
    summary = adapter_summary(repo_id, commit.oid, private, manifest)
    summary["tags"] = [name for name, oid in state.storage.refs(repo_id)["tag"] if oid == commit.oid]
    json.dumps(summary, allow_nan=False)  # what the JSON listing sends
    _article(summary, card.body)  # what the page renders
    return summary, card.body


@router.get("/api/adapters")
def list_adapters(
    request: Request, state: State, caller: Caller, task: str | None = None, base: str | None = None
) -> list[dict[str, Any]]:
    root = base_url(request)
    out = []
    for summary, _ in find_adapters(state, caller, task or None, base or None):
        summary["url"] = f"{root}/{summary['repo_id']}"
        out.append(summary)
    return out


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>adapterdock hub</title>
<style>
body{{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}}
article{{border:1px solid #ccc;border-radius:6px;padding:0.5rem 1rem;margin:1rem 0}}
pre{{background:#f6f6f6;padding:0.5rem;white-space:pre-wrap}} code{{background:#f0f0f0}}
.meta{{color:#555;font-size:0.9rem}}
</style></head><body>
<h1>adapterdock hub</h1>
<form method="get">task <select name="task"><option value="">any</option>{task_options}</select>
base <input name="base" value="{base}" placeholder="fingerprint or name"> <button>filter</button></form>
<p>{count} adapter(s). Pull one with <code>adapterdock hub pull REPO --endpoint {root}</code>.</p>
{articles}
</body></html>
"""


def _article(summary: dict[str, Any], body: str) -> str:
    e = html.escape
    metrics = ", ".join(f"{e(str(k))}={e(str(v))}" for k, v in sorted(summary["metrics"].items())) or "-"
    tags = ", ".join(e(t) for t in summary["tags"]) or "-"
    return (
        f"<article><h2>{e(summary['repo_id'])}</h2>"
        f"<p class=meta>{e(summary['name'])} v{summary['version']} &middot; "
        f"task {e(summary['task'])} &middot; "
        f"method {e(summary['method'])} &middot; base {e(summary['base']['name_or_path'])} "
        f"(<code>{e(summary['base']['fingerprint'])}</code>) &middot; tags {tags}"
        f"{' &middot; private' if summary['private'] else ''}</p>"
        f"<p class=meta>metrics: {metrics}</p><pre>{e(body.strip()[:20000])}</pre></article>"
    )


@router.get("/", response_class=HTMLResponse)
def index(
    request: Request, state: State, caller: Caller, task: str | None = None, base: str | None = None
) -> HTMLResponse:
    found = find_adapters(state, caller, task or None, base or None)
    options = "".join(f'<option value="{t}"{" selected" if t == task else ""}>{t}</option>' for t in TASKS)
    page = _PAGE.format(
        task_options=options,
        base=html.escape(base or ""),
        count=len(found),
        root=html.escape(base_url(request)),
        articles="\n".join(_article(s, b) for s, b in found),
    )
    return HTMLResponse(page)

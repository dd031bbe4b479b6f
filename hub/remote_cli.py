"""`adapterdock hub push|pull|serve|gc`: the remote-hub commands, added to the `adapterdock hub` parser.

`hub.cli` calls `add_remote_commands(subparsers, formatter)`; each command stores a
`handler(args, store) -> int`. This module does not import `hub.cli` (no import cycle): the help
formatter comes in as an argument.
Boundary: argument parsing and printing; the work is in `hub.remote` (client) and `hub.service` (server),
both imported only when their command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hub.store import LocalStore

ENDPOINT_HELP = "hub URL (default: $HF_ENDPOINT, else https://huggingface.co)"
TOKEN_HELP = "access token (default: $HF_TOKEN)"


def add_remote_commands(subparsers: Any, help_formatter: Callable[[str], argparse.HelpFormatter]) -> None:
    """Add `push`, `pull`, `serve` and `gc` to the `adapterdock hub` subparsers.

    Args:
        subparsers: what `ArgumentParser.add_subparsers` returned for `adapterdock hub`.
        help_formatter: the formatter class (or factory) every hub command uses.
    """
    push = subparsers.add_parser(
        "push",
        formatter_class=help_formatter,
        help="upload an adapter version to the HF Hub or a self-hosted hub",
        description="Upload one registered version (files, manifest, card) in one commit, tagged v<version>.",
        epilog="example:\n  adapterdock hub push sentiment@3 --repo acme/sentiment --endpoint http://127.0.0.1:8080",
    )
    push.add_argument("ref", help="adapter to push: NAME, NAME@VERSION or NAME@TAG")
    push.add_argument("--repo", required=True, help="hub repo ORG/NAME (created if missing)")
    push.add_argument("--endpoint", default=None, help=ENDPOINT_HELP)
    push.add_argument("--token", default=None, help=TOKEN_HELP)
    push.add_argument("--revision", default=None, help="branch to commit to (default main)")
    push.add_argument("--private", action="store_true", help="create the repo private")
    push.set_defaults(handler=run_push)

    pull = subparsers.add_parser(
        "pull",
        formatter_class=help_formatter,
        help="download an adapter from a hub into the local registry",
        description="Download one version, verify its sha256s and base, and register it as a new version.",
        epilog=(
            "example:\n  adapterdock hub pull acme/sentiment@v3 --endpoint http://127.0.0.1:8080 "
            "--base tiny\n  adapterdock hub pull acme/sentiment --as sentiment-from-acme"
        ),
    )
    pull.add_argument("repo", help="ORG/NAME or ORG/NAME@REVISION (branch, tag such as v3, or commit)")
    pull.add_argument("--endpoint", default=None, help=ENDPOINT_HELP)
    pull.add_argument("--token", default=None, help=TOKEN_HELP)
    pull.add_argument("--as", dest="as_name", default=None, help="register under this name")
    pull.add_argument("--base", default=None, help="base it must fit (built-in, folder, registry:NAME)")
    pull.set_defaults(handler=run_pull)

    serve = subparsers.add_parser(
        "serve",
        formatter_class=help_formatter,
        help="run a self-hosted hub (HF Hub API subset + adapter browsing)",
        description="Serve repos over the part of the HF Hub API that huggingface_hub uses. See docs/hub.md.",
        epilog="example:\n  adapterdock hub serve --root ./hub-data --port 8080 --token-file tokens.txt",
    )
    serve.add_argument("--root", required=True, type=Path, help="folder for blobs and the index")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    serve.add_argument("--token-file", type=Path, default=None, help="tokens and rights; none = open hub")
    serve.set_defaults(handler=run_serve)

    gc = subparsers.add_parser(
        "gc",
        formatter_class=help_formatter,
        help="remove blobs of a self-hosted hub that no commit references",
        description=(
            "Delete the blob files no commit of any repo references and no repo has claimed (uploads "
            "whose commit never came, blobs of deleted repos). Safe while the hub runs."
        ),
        epilog="example:\n  adapterdock hub gc --root ./hub-data --grace 3600",
    )
    gc.add_argument("--root", required=True, type=Path, help="the hub service's --root")
    gc.add_argument(
        "--grace",
        type=float,
        default=3600.0,
        help="keep blobs stored less than this many seconds ago (uploads in progress; default 3600)",
    )
    gc.set_defaults(handler=run_gc)


def run_push(args: argparse.Namespace, store: LocalStore) -> int:
    from hub.remote import HubClient

    client = HubClient(endpoint=args.endpoint, token=args.token)
    manifest = store.get(args.ref, verify=False).manifest
    commit = client.push(store, args.ref, args.repo, revision=args.revision, private=args.private)
    print(f"pushed {manifest.ref} to {client.endpoint}/{args.repo} as v{manifest.version} (commit {commit})")
    return 0


def run_pull(args: argparse.Namespace, store: LocalStore) -> int:
    from hub.remote import HubClient, split_repo_revision

    repo_id, revision = split_repo_revision(args.repo)
    expected = None
    if args.base:
        from hub.bases import resolve_base

        expected = resolve_base(args.base, registry=store.root).spec
    client = HubClient(endpoint=args.endpoint, token=args.token)
    manifest = client.pull(repo_id, revision, store=store, as_name=args.as_name, expected_base=expected)
    if expected is None:
        print(
            f"warning: no --base named; {manifest.ref} expects {manifest.base.name_or_path} "
            f"({manifest.base.fingerprint}), not checked"
        )
    print(f"pulled {args.repo} from {client.endpoint} as {manifest.ref}")
    return 0


def run_serve(args: argparse.Namespace, store: LocalStore) -> int:
    from hub.service.app import serve

    serve(args.root, host=args.host, port=args.port, token_file=args.token_file)
    return 0


def run_gc(args: argparse.Namespace, store: LocalStore) -> int:
    from hub.service.storage import Storage

    if not (args.root / "index.sqlite").is_file():
        raise SystemExit(f"error: {args.root} is not a hub service root (no index.sqlite)")
    removed = Storage(args.root, clean_tmp=False).collect(min_age_s=max(args.grace, 0.0))
    print(f"removed {len(removed)} unreferenced blob(s) from {args.root}")
    return 0

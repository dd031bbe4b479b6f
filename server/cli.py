"""`adapterdock serve`: start the inference server (also `python -m server`).

Boundary: flags -> `ServerConfig` -> `create_app` -> uvicorn. Flag help comes from the config's field
docstrings, so the two never drift apart.

Example:
    adapterdock serve --base tiny --quantize none --registry adapters --port 8000 --preload sentiment@prod
"""

from __future__ import annotations

import argparse
import ast
import inspect
import logging
import os
import sys
from pathlib import Path

from hub.errors import AdapterDockError
from server.config import DTYPE_CHOICES, LOG_LEVELS, QUANTIZE_CHOICES, ServerConfig
from server.feedback.auth import read_rater_tokens
from server.keys import read_keys_file

EPILOG = """\
example:
  adapterdock serve --base tiny --quantize none --registry adapters --port 8000 --preload sentiment@prod
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "my-instruct", "prompt": "Hello", "max_tokens": 16}'

environment: ADAPTERDOCK_API_KEY (instead of --api-key), ADAPTERDOCK_RATER_TOKEN (instead of --rater-token),
ADAPTERDOCK_ADMIN_KEY (instead of --admin-key), HF_TOKEN (token for --hub), ADAPTERDOCK_REGISTRY.
docs/server.md lists every endpoint."""


def _field_docs() -> dict[str, str]:
    """Field name -> the docstring under it in `ServerConfig`."""
    tree = ast.parse(inspect.getsource(ServerConfig))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, following in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def build_parser() -> argparse.ArgumentParser:
    docs, d = _field_docs(), ServerConfig()
    parser = argparse.ArgumentParser(
        prog="adapterdock serve",
        description="Serve one base model with many adapters swapped per request "
        "(OpenAI-, LoRAX/TGI-compatible and task endpoints).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def add(flag: str, field: str, **kwargs: object) -> None:
        default = kwargs.pop("default", getattr(d, field))
        parser.add_argument(
            flag, dest=field, default=default, help=f"{docs[field]} (default: {default})", **kwargs
        )

    add("--base", "base")
    add("--quantize", "quantize", choices=QUANTIZE_CHOICES)
    add("--dtype", "dtype", choices=DTYPE_CHOICES)
    add("--threads", "threads", type=int, metavar="N")
    add("--load-threads", "load_threads", type=int, metavar="N")
    add("--registry", "registry", type=Path)
    add("--hub", "hub", metavar="URL")
    add("--hub-refresh", "hub_refresh", type=float, metavar="SECONDS")
    add("--hub-timeout", "hub_timeout", type=float, metavar="SECONDS")
    add("--hub-max-pulls", "hub_max_pulls", type=int, metavar="N")
    add("--host", "host")
    add("--port", "port", type=int)
    add("--max-adapters", "max_adapters", type=int, metavar="N")
    add("--max-adapter-memory", "max_adapter_memory_mb", type=float, metavar="MB")
    add("--max-rank", "max_rank", type=int, metavar="R")
    add("--memory-budget", "memory_budget_mb", type=float, metavar="MIB")
    add("--preload", "preload", nargs="+", action="extend", metavar="REF", default=[])
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--api-key", dest="api_key", default=None, help=docs["api_key"])
    keys.add_argument("--api-key-file", dest="api_key_file", type=Path, default=None,
                      help="File whose first line is the API key (keeps it out of `ps`).")  # fmt: skip
    raters = parser.add_mutually_exclusive_group()
    raters.add_argument("--rater-token", dest="rater_token", default=None, help=docs["rater_token"])
    raters.add_argument("--rater-token-file", dest="rater_token_file", type=Path, default=None,
                        help="File whose first line is the rater token (keeps it out of `ps`).")  # fmt: skip
    raters.add_argument("--rater-tokens-file", dest="rater_tokens_file", type=Path, default=None,
                        help="File of `rater_id:token` lines, one token per rater (# comments).")  # fmt: skip
    admin = parser.add_mutually_exclusive_group()
    admin.add_argument("--admin-key", dest="admin_key", default=None, help=docs["admin_key"])
    admin.add_argument("--admin-key-file", dest="admin_key_file", type=Path, default=None,
                       help="File whose first line is the admin key (keeps it out of `ps`).")  # fmt: skip
    refusal = " A malformed file stops the start, listing every bad entry."
    parser.add_argument("--keys-file", dest="keys_file", type=Path, default=None, metavar="FILE",
                        help=docs["keys"] + refusal)  # fmt: skip
    add("--max-judgements-per-rater", "max_judgements_per_rater", type=int, metavar="N")
    add("--feedback-db", "feedback_db", type=Path, metavar="FILE")
    add("--max-batch-size", "max_batch_size", type=int, metavar="N")
    add("--max-queue", "max_queue", type=int, metavar="N")
    add("--max-input-tokens", "max_input_tokens", type=int, metavar="N")
    add("--max-new-tokens", "max_new_tokens", type=int, metavar="N")
    add("--max-inputs-per-request", "max_inputs_per_request", type=int, metavar="N")
    add("--max-body-bytes", "max_body_bytes", type=int, metavar="BYTES")
    add("--adapter-wait-timeout", "adapter_wait_timeout", type=float, metavar="SECONDS")
    add("--log-level", "log_level", choices=LOG_LEVELS)
    return parser


def _secret(value: str | None, file: Path | None, env: str) -> str | None:
    """A key from its flag, else the first line of its file, else the environment variable `env`."""
    if file is not None:
        lines = file.read_text(encoding="utf-8").splitlines()
        return lines[0].strip() if lines else ""
    return value if value is not None else os.environ.get(env) or None


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The validated `ServerConfig` for parsed flags (plus the environment's keys)."""
    api_key = _secret(args.api_key, args.api_key_file, "ADAPTERDOCK_API_KEY")
    rater_token = _secret(args.rater_token, args.rater_token_file, "ADAPTERDOCK_RATER_TOKEN")
    admin_key = _secret(args.admin_key, args.admin_key_file, "ADAPTERDOCK_ADMIN_KEY")
    rater_tokens = read_rater_tokens(args.rater_tokens_file) if args.rater_tokens_file is not None else {}
    keys = read_keys_file(args.keys_file) if args.keys_file is not None else ()
    files = ("api_key_file", "rater_token_file", "rater_tokens_file", "admin_key_file", "keys_file")
    values = {k: v for k, v in vars(args).items() if k not in files}
    values.update(
        api_key=api_key,
        rater_token=rater_token,
        rater_tokens=rater_tokens,
        admin_key=admin_key,
        keys=keys,
        preload=tuple(args.preload),
        hub_token=os.environ.get("HF_TOKEN"),
    )
    return ServerConfig(**values).validate()


def main(argv: list[str] | None = None) -> int:
    """Parse flags and run the server until interrupted; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # `python -m server serve ...` reads like the console script
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except (AdapterDockError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    level = getattr(logging, config.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from server.app import create_app

    uvicorn.run(
        create_app(config),
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        timeout_graceful_shutdown=15,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

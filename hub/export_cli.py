"""`adapterdock export vllm REF... --out DIR`: registry adapters as plain PEFT folders for another server.

Boundary: argument parsing and printing only; the work is in `hub.vllm_export`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hub.errors import AdapterDockError
from hub.store import LocalStore

REGISTRY_HELP = "registry folder (default: $ADAPTERDOCK_REGISTRY or ./adapters)"
help_formatter = argparse.RawDescriptionHelpFormatter  # keeps the examples laid out as written


def build_parser(prog: str = "adapterdock export") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        formatter_class=help_formatter,
        description="Write registry adapters out for another serving engine.",
        epilog="example:\n  adapterdock export vllm sentiment@3 chat@prod --out ./vllm-adapters",
    )
    sub = parser.add_subparsers(dest="target", required=True)
    vllm = sub.add_parser(
        "vllm",
        formatter_class=help_formatter,
        help="plain PEFT folders plus the `vllm serve --lora-modules` command line",
        description=(
            "Resolve each reference to its immutable NAME@VERSION, verify it, check that vLLM can serve "
            "it (generation task, plain LoRA, one base), copy its PEFT files to DIR/NAME@VERSION/, and "
            "print the `vllm serve` command (also written to DIR/vllm-serve.sh). Clients then send "
            "NAME@VERSION as `model`. To serve straight from the registry instead, see the resolver "
            "plugin in docs/scaling.md."
        ),
        epilog="example:\n  adapterdock export vllm sentiment@3 chat@prod --out ./vllm-out --base ./my-base",
    )
    vllm.add_argument("refs", nargs="+", metavar="REF", help="NAME, NAME@VERSION or NAME@TAG")
    vllm.add_argument("--out", required=True, type=Path, help="folder to write (created if absent)")
    vllm.add_argument(
        "--base",
        default=None,
        help="the base vLLM will serve (default: the one the adapters were trained on)",
    )
    vllm.add_argument("--registry", type=Path, default=None, help=REGISTRY_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point for `adapterdock export`."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from hub.bases import resolve_base
    from hub.vllm_export import export_for_vllm

    store = LocalStore(args.registry)
    try:
        base = resolve_base(args.base, registry=store.root) if args.base else None
        export = export_for_vllm(store, args.refs, args.out, base=base)
    except AdapterDockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for ref, folder in export.modules.items():
        print(f"wrote {ref} -> {folder}")
    print(f"\n# serve them (also in {export.script}):\n{export.command_line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`adapterdock base ...` and `adapterdock hub ...`: base models and the adapter registry from the shell.

Run as `adapterdock hub --help`, `python -m hub --help`, or `adapterdock base --help`.
Boundary: argument parsing and printing only; the work is done by hub.bases, hub.store and hub.remote.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from hub.adapter_format import detect_adapter_format
from hub.bases import describe_base, resolve_base
from hub.builtin_bases import BUILTIN_BASES, create_builtin_base
from hub.compat import check_fits_base
from hub.errors import AdapterDockError, BaseMismatchError, CorruptAdapterError
from hub.manifest import TASKS, Manifest
from hub.peft_config import is_dora
from hub.ref import AdapterRef
from hub.remote_cli import add_remote_commands
from hub.store import LocalStore, default_registry_root
from hub.traffic import TrafficSplit, parse_split

REGISTRY_HELP = "registry folder (default: $ADAPTERDOCK_REGISTRY or ./adapters)"


def help_formatter(prog: str) -> argparse.HelpFormatter:
    """Keeps the examples in each epilog laid out as written."""
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


# ---- base --------------------------------------------------------------------------------------
def build_base_parser(prog: str = "adapterdock base") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        formatter_class=help_formatter,
        description="Create and inspect base models (built-ins: smollm2-135m, tiny, small; or an HF folder).",
        epilog="example:\n  adapterdock base create tiny --out ./tiny-base\n  adapterdock base show tiny",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser(
        "create",
        formatter_class=help_formatter,
        help="write a built-in base (weights, tokenizer, chat template) to a folder",
        description="Write a built-in base model, deterministically, in HF format: "
        + "; ".join(f"{b.name}: {b.summary}" for b in BUILTIN_BASES.values())
        + ".",
        epilog="example:\n  adapterdock base create smollm2-135m --out ./smollm2-base",
    )
    create.add_argument("name", choices=sorted(BUILTIN_BASES), help="built-in base to create")
    create.add_argument("--out", required=True, type=Path, help="folder to write (created if absent)")
    show = sub.add_parser(
        "show",
        formatter_class=help_formatter,
        help="print a base's path, parameter count, dtype and fingerprint",
        description="Resolve a base (built-in name, folder, registry:NAME, HF id) and describe it.",
        epilog="example:\n  adapterdock base show tiny",
    )
    show.add_argument("name", help="built-in name, local folder, registry:NAME or HF model id")
    show.add_argument("--registry", type=Path, default=None, help=REGISTRY_HELP)
    return parser


def run_base(args: argparse.Namespace) -> int:
    if args.command == "create":
        path = create_builtin_base(args.name, args.out)
        info = describe_base(resolve_base(str(path)))
        print(f"wrote {args.name} to {path} ({info['parameters']:,} parameters, {info['fingerprint']})")
        return 0
    info = describe_base(resolve_base(args.name, registry=args.registry))
    for key, value in info.items():
        print(f"{key:12} {value:,}" if isinstance(value, int) else f"{key:12} {value}")
    return 0


# ---- hub ---------------------------------------------------------------------------------------
def build_hub_parser(prog: str = "adapterdock hub") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        formatter_class=help_formatter,
        description="The adapter registry: list, show, tag, remove and import adapters; push and pull them.",
        epilog=(
            "example:\n  adapterdock hub list --task classification\n  adapterdock hub show sentiment@prod"
        ),
    )
    parser.add_argument("--registry", type=Path, default=None, help=REGISTRY_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    lst = sub.add_parser("list", formatter_class=help_formatter, help="list registered adapters",
                         epilog="example:\n  adapterdock hub list --task ner --all-versions")  # fmt: skip
    lst.add_argument("--task", choices=TASKS, help="only adapters of this task")
    lst.add_argument("--base", help="only adapters for this base (fingerprint or name)")
    lst.add_argument("--all-versions", action="store_true", help="every version, not just the latest")
    lst.add_argument("--json", action="store_true", help="print manifests as JSON")

    show = sub.add_parser("show", formatter_class=help_formatter, help="print an adapter's manifest and card",
                          epilog="example:\n  adapterdock hub show sentiment@2")  # fmt: skip
    show.add_argument("ref", help="NAME, NAME@VERSION or NAME@TAG")
    show.add_argument("--resolve", action="store_true",
                      help="print only the immutable NAME@VERSION the reference names now "
                           "(send that to vLLM)")  # fmt: skip

    rm = sub.add_parser(
        "rm",
        formatter_class=help_formatter,
        help="remove a version, or every version of a name",
        epilog="example:\n  adapterdock hub rm sentiment@1",
    )
    rm.add_argument("ref", help="NAME (all versions), NAME@VERSION or NAME@TAG")

    tag = sub.add_parser("tag", formatter_class=help_formatter, help="point a movable tag at a version",
                         epilog="example:\n  adapterdock hub tag sentiment@3 prod")  # fmt: skip
    tag.add_argument("ref", help="the version to tag")
    tag.add_argument("tag", help="tag name, e.g. prod")

    route = sub.add_parser(
        "route",
        formatter_class=help_formatter,
        help="split a tag's traffic between versions (canaries), or promote one",
        description="Send requests for NAME@TAG to several versions by weight: the same OpenAI `user` "
        "always gets the same version, requests without one are drawn by weight. A running server "
        "follows the change from its next request. --promote V moves all traffic to V (a plain tag again).",
        epilog="example:\n  adapterdock hub route support prod --split 3=90,4=10\n"
        "  adapterdock hub route support prod --promote 4",
    )
    route.add_argument("name", help="the adapter name")
    route.add_argument("tag", help="the tag to split, e.g. prod")
    how = route.add_mutually_exclusive_group(required=True)
    how.add_argument("--split", metavar="V=W,...", help="versions with positive integer weights: 3=90,4=10")
    how.add_argument("--promote", metavar="V", type=int, help="send all traffic to version V")

    imp = sub.add_parser(
        "import",
        formatter_class=help_formatter,
        help="register an existing PEFT adapter folder made elsewhere",
        description="Register a folder written by PEFT's save_pretrained (or an adapterdock bottleneck "
        "adapter) after checking that its tensors fit the base.",
        epilog=(
            "example:\n  adapterdock hub import ./my-lora --name support-bot --task instruction --base tiny"
        ),
    )
    imp.add_argument("folder", type=Path, help="the adapter folder")
    imp.add_argument("--name", required=True, help="registry name for it")
    imp.add_argument("--task", required=True, choices=TASKS, help="what the adapter does")
    imp.add_argument("--base", help="its base (default: base_model_name_or_path in adapter_config.json)")
    imp.add_argument("--labels", help="comma-separated labels, in class-id order (classification, ner)")
    imp.add_argument("--method", choices=IMPORT_METHODS,
                     help="how it was trained (default: read off the folder: bottleneck, dora when "
                          "adapter_config.json has use_dora, else lora)")  # fmt: skip
    imp.add_argument("--tag", action="append", default=[], help="tag the new version (repeatable)")

    add_remote_commands(sub, help_formatter)
    for command in sub.choices.values():  # `hub --registry R CMD` and `hub CMD --registry R` both work
        command.add_argument("--registry", type=Path, default=argparse.SUPPRESS, help=REGISTRY_HELP)
    return parser


def run_hub(args: argparse.Namespace) -> int:
    store = LocalStore(args.registry if args.registry is not None else default_registry_root())
    if args.command == "list":
        manifests = store.list(task=args.task, base=args.base, all_versions=args.all_versions)
        if args.json:
            print(json.dumps([m.to_dict() for m in manifests], indent=2))
            return 0
        if not manifests:
            print(f"no adapters in {store.root}")
        for m in manifests:
            tags = ",".join(t for t, v in store.tags(m.name).items() if v == m.version)
            metrics = " ".join(f"{k}={v:.4g}" for k, v in m.metrics.items() if isinstance(v, (int, float)))
            print(f"{m.ref:32} {m.task:14} {m.method:10} [{tags}] {m.base.name_or_path} {metrics}")
        for name in dict.fromkeys(m.name for m in manifests):  # a split tag names no single version
            for tag, split in store.routes(name).items():
                print(f"{name}@{tag} -> {describe_split(name, split)}")
        return 0
    if args.command == "show":
        if args.resolve:  # a tag moves; the version it names now does not (docs/scaling.md)
            print(store.resolve(args.ref))
            return 0
        stored = store.get(args.ref)
        ref = AdapterRef.parse(args.ref)
        split = store.routes(ref.name).get(ref.tag) if ref.tag else None
        if split is not None:  # the manifest below is the split's main version
            print(f"{ref} -> {describe_split(ref.name, split)}")
        print(stored.manifest.to_json())
        card = stored.path / "README.md"
        if card.is_file():
            print(card.read_text(encoding="utf-8"))
        return 0
    if args.command == "rm":
        removed = store.delete(args.ref)
        print("removed " + ", ".join(str(r) for r in removed))
        return 0
    if args.command == "tag":
        resolved = store.tag(args.ref, args.tag)
        print(f"{resolved.name}@{args.tag} -> {resolved}")
        return 0
    if args.command == "route":
        if args.promote is not None:
            resolved = store.tag(AdapterRef(args.name, version=args.promote), args.tag)
            print(f"{args.name}@{args.tag} -> {resolved} (all traffic)")
        else:
            split = parse_split(args.split)
            store.route(args.name, args.tag, split)
            print(f"{args.name}@{args.tag} -> {describe_split(args.name, split)}")
        return 0
    if args.command == "import":
        manifest = import_folder(store, args)
        print(f"registered {manifest.ref}")
        return 0
    handler = getattr(args, "handler", None)
    if handler is None:
        raise SystemExit(f"unknown command {args.command}")
    return int(handler(args, store) or 0)


def describe_split(name: str, split: TrafficSplit) -> str:
    """`support@3 90%, support@4 10% (sticky per user)`."""
    shares = ", ".join(f"{name}@{v} {100 * w / split.total:.3g}%" for v, w in split.weights)
    return f"{shares} (split {split.describe()}, sticky per user)"


_FAMILY = {"lora": "lora", "qlora": "lora", "dora": "dora", "qdora": "dora", "bottleneck": "bottleneck"}
"""Method -> the kind of adapter folder it leaves (a 4-bit base changes the method, not the files)."""
IMPORT_METHODS = tuple(_FAMILY)
"""What `hub import --method` accepts: the methods whose result is an adapter folder (not full weights)."""


def import_method(adapter_format: str, config: dict, asked: str | None) -> str:
    """The manifest's method for an imported folder: what the files are (bottleneck; DoRA when
    `use_dora`; else LoRA), refined by `--method` (qlora / qdora: trained on a 4-bit base) but never
    contradicting them, so a DoRA adapter is never registered as a plain LoRA.

    Raises:
        CorruptAdapterError: `--method` names another kind of adapter than the folder holds.
    """
    found = "bottleneck" if adapter_format == "bottleneck" else "dora" if is_dora(config) else "lora"
    if asked is None:
        return found
    if _FAMILY[asked] != found:
        hint = " or ".join(method for method, family in _FAMILY.items() if family == found)
        raise CorruptAdapterError(
            f"--method {asked} does not match the folder, which holds a {found} adapter.",
            f"Pass --method {hint}, or leave --method out to read it off the folder.",
        )
    return asked


def import_folder(store: LocalStore, args: argparse.Namespace) -> Manifest:
    """Check an outside adapter folder against its base and register it."""
    folder: Path = args.folder
    adapter_format = detect_adapter_format(folder)
    config_file = folder / ("adapter_config.json" if adapter_format == "peft" else "bottleneck_config.json")
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    base_name = args.base or config.get("base_model_name_or_path")
    if not base_name:
        raise BaseMismatchError(f"{folder} names no base model.", "Pass --base.")
    base = resolve_base(base_name, registry=store.root)
    check_fits_base(folder, base.path, adapter_format)
    labels = [x.strip() for x in args.labels.split(",")] if args.labels else []
    return store.put(
        folder,
        name=args.name,
        task=args.task,
        method=import_method(adapter_format, config, args.method),
        base=base.spec,
        labels=labels,
        trainer={"imported_from": str(folder.resolve()), "adapter_config": config},
        adapter_format=adapter_format,
        tags=args.tag,
    )


def main(argv: list[str] | None = None, group: str = "hub") -> int:
    """Entry point for `adapterdock hub` (group="hub") and `adapterdock base` (group="base")."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_base_parser() if group == "base" else build_hub_parser()
    args = parser.parse_args(argv)
    try:
        return run_base(args) if group == "base" else run_hub(args)
    except AdapterDockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def main_base(argv: list[str] | None = None) -> int:
    """Entry point for `adapterdock base`."""
    return main(argv, group="base")


if __name__ == "__main__":
    sys.exit(main())

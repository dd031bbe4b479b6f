"""`adapterdock train TASK ...` (also `python -m trainers TASK ...`): flags built from each recipe's Config.

Every recipe module (`trainers.classification`, `.ner`, `.instruction`, `.reward`, `.dpo`, `.ppo`)
exposes `Config` (a `TrainConfig` dataclass), `train(config)`, `HELP` and `EXAMPLE`. Each Config
field becomes a `--flag` whose help is the field's `metadata["help"]`; `--config FILE.yaml` takes
the same keys and command-line flags win over it. `--registry` is also accepted before TASK, as
`adapterdock hub` takes it on either side of its command. Recipes are imported lazily (only the
one named, when a TASK is given). Prints the registered `name@version` and the eval metrics.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any

from hub.errors import AdapterDockError

RECIPES = {
    "classification": "trainers.classification",
    "ner": "trainers.ner",
    "instruction": "trainers.instruction",
    "reward": "trainers.reward",
    "dpo": "trainers.dpo",
    "ppo": "trainers.ppo",
}
EPILOG = """examples:
  adapterdock train classification --base tiny --data reviews.jsonl --name sentiment
  adapterdock train ner --base tiny --data train.conll --name my-ner --method qlora
  adapterdock train instruction --config run.yaml --epochs 2   # flags override the YAML

Run `adapterdock train TASK --help` for every option of a task."""


def load_recipe(task: str) -> types.ModuleType:
    """Import a recipe module (every recipe ships in the same wheel as this command)."""
    return importlib.import_module(RECIPES[task])


def _flag_type(annotation: Any) -> tuple[Any, bool]:
    """(scalar type, is_list) for a Config field annotation like `int`, `str | None`, `list[str]`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is list:
        return (args[0] if args else str), True
    if args:  # X | None
        return _flag_type(args[0])
    return annotation, False


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One `--flag` per dataclass field (defaults shown, values left unset unless given)."""
    hints = typing.get_type_hints(config_cls)
    for item in dataclasses.fields(config_cls):
        kind, is_list = _flag_type(hints[item.name])
        default = item.default_factory() if item.default_factory is not dataclasses.MISSING else item.default
        shown = "required" if item.metadata.get("required") else f"default: {default}"
        kwargs: dict[str, Any] = {
            "dest": item.name,
            "default": argparse.SUPPRESS,
            "help": f"{item.metadata.get('help', '')} ({shown})",
        }
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            kwargs["metavar"] = item.name.upper()
            if is_list:
                kwargs["nargs"] = "+"
            if item.metadata.get("choices"):
                kwargs["choices"] = item.metadata["choices"]
                kwargs.pop("metavar")
        flags = [f"--{item.name.replace('_', '-')}"]
        if item.metadata.get("flag"):  # a short spelling, e.g. --from for from_adapter
            flags.insert(0, f"--{item.metadata['flag']}")
        parser.add_argument(*flags, **kwargs)


def build_parser(tasks: list[str] | None = None) -> argparse.ArgumentParser:
    """The `adapterdock train` parser with a subcommand per available recipe."""
    parser = argparse.ArgumentParser(
        prog="adapterdock train",
        description="Train an adapter (or a full model) and register it in the local registry.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--registry",
        default=argparse.SUPPRESS,
        metavar="REGISTRY",
        help="Registry folder, as after TASK (default: $ADAPTERDOCK_REGISTRY or ./adapters).",
    )
    subparsers = parser.add_subparsers(dest="task", metavar="TASK")
    for task in tasks or list(RECIPES):
        recipe = load_recipe(task)
        sub = subparsers.add_parser(
            task,
            help=recipe.HELP,
            description=recipe.HELP,
            epilog=f"example:\n  {recipe.EXAMPLE}\n\nA YAML file given with --config uses the "
            "same keys as the flags (max_steps or max-steps); flags win.",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("--config", metavar="FILE.yaml", help="Read options from a YAML file.")
        add_config_arguments(sub, recipe.Config)
    return parser


def read_yaml(path: str) -> dict[str, Any]:
    """The mapping in a YAML config file (ConfigError when unreadable or not a mapping)."""
    import yaml

    from trainers.configs import ConfigError

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read --config {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of option: value")
    data.pop("task", None)
    return {key.replace("-", "_"): value for key, value in data.items()}


def format_metrics(metrics: dict[str, Any]) -> str:
    """`key: value` lines, floats to 4 places."""
    return "\n".join(
        f"  {key}: {value:.4f}" if isinstance(value, float) else f"  {key}: {value}"
        for key, value in metrics.items()
    )


def main(argv: list[str] | None = None) -> int:
    """Parse, merge YAML and flags, train, print the registered reference and metrics."""
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([first] if first in RECIPES else None)
    args = vars(parser.parse_args(argv))
    task = args.pop("task", None)
    if task is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    recipe = load_recipe(task)
    try:
        values = read_yaml(args.pop("config")) if args.get("config") else {}
        args.pop("config", None)
        values |= args
        config = recipe.Config.from_dict(values)
        manifest = recipe.train(config)
    except AdapterDockError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if manifest is not None:  # None on non-main processes under torchrun
        print(f"registered {manifest.ref}")
        print(format_metrics(manifest.metrics))
    return 0

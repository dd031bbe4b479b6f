"""The `adapterdock` command: one entry point, each subcommand group owned by its package.

Groups are imported lazily so `adapterdock hub list` never loads torch.
"""

from __future__ import annotations

import importlib
import os
import sys

from adapterdock import __version__

GROUPS: dict[str, tuple[str, str]] = {
    "base": ("hub.cli:main_base", "create and inspect base models (smollm2-135m, tiny, small, HF folders)"),
    "train": ("trainers.cli:main", "train an adapter: classification, ner, instruction, reward, dpo, ppo"),
    "hub": ("hub.cli:main", "the adapter registry: list, show, tag, rm, import, push, pull, serve"),
    "export": ("hub.export_cli:main", "write registry adapters out for another server: vllm"),
    "serve": ("server.cli:main", "serve one base with many adapters over HTTP (OpenAI, LoRAX APIs)"),
    "feedback": ("server.feedback.cli:main", "export and summarise human preference judgements"),
    "quickstart": ("adapterdock.quickstart:main", "build tiny, train three adapters, serve them"),
}

USAGE = f"""usage: adapterdock [--version] <group> [args...]

adapterdock {__version__}: an adapter hub and swapping server for LLMs.

groups:
{chr(10).join(f"  {name:12} {help_}" for name, (_, help_) in GROUPS.items())}

Run `adapterdock <group> --help` for each group's commands.

example:
  adapterdock base show tiny
  adapterdock train classification --base tiny --data reviews.jsonl --name sentiment
  adapterdock serve --base tiny --quantize nf4
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"adapterdock {__version__}")
        return 0
    group, rest = argv[0], argv[1:]
    if group not in GROUPS:
        print(f"adapterdock: unknown group {group!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    target = GROUPS[group][0]
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"adapterdock: the {group!r} group is not available in this build.", file=sys.stderr)
            return 2
        raise
    try:
        result = getattr(module, func_name)(rest)
    except BrokenPipeError:  # `adapterdock hub show X | head`: the reader left, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())

"""The dependency rules of docs/architecture.md, enforced by reading every module's imports (ast, no import).

`trainers -> hub <- server`: hub imports neither (nor torch, transformers, peft, bitsandbytes); server never
imports trainers; the training recipes never import each other. The contract between training and serving is
data (the adapter folder, read by `hub.adapter_format`), not shared code. Imports inside functions and under
`TYPE_CHECKING` count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "classification": ("classification",),
    "ner": ("ner",),
    "instruction": ("instruction",),
    "reward": ("reward",),
    "dpo": ("dpo",),
    "ppo": ("ppo", "ppo_rollout"),
}
"""Recipe -> its modules under trainers/ (a helper split out of a recipe for size belongs to it)."""


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`, relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def violations(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    """`file:line imports X` for every import in `paths` of a module in (or under) `forbidden`."""
    found = []
    for path in paths:
        for line, name in imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return sorted(set(found))


def python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_the_rules_see_imports_of_every_kind(tmp_path: Path) -> None:
    """The checker itself: plain, from, relative, lazy and TYPE_CHECKING imports are all found."""
    pkg = tmp_path / "pkg" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "mod.py").write_text(
        "import torch.nn\nfrom .. import other\nfrom .sibling import x\n"
        "if TYPE_CHECKING:\n    from server.app import App\ndef f():\n    import peft\n"
    )
    names = {name for _, name in imports(pkg / "mod.py", root=tmp_path)}
    assert {"torch.nn", "pkg.other", "pkg.sub.sibling", "server.app", "peft"} <= names


def test_hub_imports_neither_server_nor_trainers_nor_torch() -> None:
    forbidden = ("torch", "server", "trainers", "transformers", "peft", "bitsandbytes")
    assert violations(python_files("hub"), forbidden) == []


def test_server_never_imports_trainers() -> None:
    assert violations(python_files("server"), ("trainers",)) == []


def test_server_modules_that_promise_no_torch_import_none() -> None:
    torch_free = [ROOT / "server" / "adapter_fit.py"]
    assert violations(torch_free, ("torch", "transformers", "peft", "bitsandbytes")) == []


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipes_never_import_each_other(recipe: str) -> None:
    own = [ROOT / "trainers" / f"{module}.py" for module in RECIPES[recipe]]
    others = tuple(f"trainers.{m}" for r, modules in RECIPES.items() if r != recipe for m in modules)
    assert all(path.is_file() for path in own), own
    assert violations(own, others) == []

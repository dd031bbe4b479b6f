"""Train the four small adapters that docs/server.md queries, in one process, a few steps each.

Run from a folder that holds (or links) `examples/`: `python examples/train_demo_adapters.py`.
It registers, in `$ADAPTERDOCK_REGISTRY` (or `./adapters`), on the built-in `tiny` base:
`tickets` (classification, tagged `prod`), `entities` (NER), `chat` (instruction, tagged `prod`) and
`rm` (reward model). They train for seconds, so their answers are only as good as a random base allows.
"""

from __future__ import annotations

from pathlib import Path

from trainers import classification, instruction, ner, reward

DATA = Path("examples/data")
SHORT = {"base": "tiny", "max_steps": 5, "batch_size": 8, "max_length": 48, "lr": 2e-3}
SHORT.update(baseline=False, progress=False)

RUNS = [
    (classification, "tickets.jsonl", "tickets", ["prod"]),
    (ner, "entities.conll", "entities", []),
    (instruction, "chat.jsonl", "chat", ["prod"]),
    (reward, "pairs.jsonl", "rm", []),
]

for recipe, data, name, tags in RUNS:
    manifest = recipe.train(recipe.Config(data=str(DATA / data), name=name, tags=tags, **SHORT))
    print(f"registered {manifest.ref} ({manifest.task})")

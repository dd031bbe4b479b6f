"""Training quality benchmark: each task x method on real data with the built-in tiny base.

Trains through the real CLI (`python -m trainers TASK ...`, one subprocess per run so peak memory
is per run) on the shared data sets, then reads the registered manifests:

- classification: SST-2 (`sst2-glue/train.tsv`, a seeded sample), scored on `sst2-glue/test.tsv`
  (the GLUE dev set, 872 sentences) -- accuracy / macro-F1 vs the majority class.
- ner: WikiANN-en (`wikiann-en/train`, a seeded sample; the `en:` prefix stripped), scored on a
  seeded sample of `wikiann-en/test` -- seqeval entity F1 vs the untrained model (all-O scores 0).
- instruction: the alpaca demo set (`llamafactory-demo/alpaca_en_demo.json`), a seeded 90/10
  split -- eval loss / perplexity on assistant tokens vs the untrained adapter.

Settings were fixed before the held-out runs and are the same for every method but the learning
rate (method defaults scaled for a randomly initialised base); nothing was tuned on test splits.
The reserved folders named in ../shared/data/README.md are never read.

Run: `python benchmarks/train_quality.py [--tasks classification ner] [--methods lora full]
[--scale 0.5] [--threads 1]`; writes benchmarks/results/train_quality.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
METHODS = ["lora", "qlora", "bottleneck", "full"]
TASKS = ["classification", "ner", "instruction"]
SEED = 0

# Per task: optimizer steps, batch size, max length, and per-method learning rates.
SETTINGS: dict[str, dict[str, Any]] = {
    "classification": {
        "steps": 150, "batch_size": 32, "max_length": 64,
        "lr": {"lora": 2e-3, "qlora": 2e-3, "bottleneck": 3e-3, "full": 3e-4},
    },
    "ner": {
        "steps": 150, "batch_size": 16, "max_length": 64,
        "lr": {"lora": 2e-3, "qlora": 2e-3, "bottleneck": 3e-3, "full": 3e-4},
    },
    "instruction": {
        "steps": 60, "batch_size": 8, "max_length": 256,
        "lr": {"lora": 2e-3, "qlora": 2e-3, "bottleneck": 3e-3, "full": 3e-4},
    },
}  # fmt: skip
PRIMARY = {"classification": "accuracy", "ner": "f1", "instruction": "loss"}


def prepare_data(root: Path, work: Path, sizes: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Write the benchmark's train/eval files into `work`; returns paths and descriptions."""
    rng = random.Random(SEED)
    sst_train = (root / "sst2-glue" / "train.tsv").read_text().splitlines()
    header, rows = sst_train[0], sst_train[1:]
    sample = rng.sample(rows, sizes["classification"])
    (work / "sst2_train.tsv").write_text("\n".join([header, *sample]) + "\n")

    def sentences(path: Path) -> list[str]:
        text = path.read_text().replace("en:", "")
        return [block for block in text.split("\n\n") if block.strip()]

    ner_train = rng.sample(sentences(root / "wikiann-en" / "train"), sizes["ner"])
    ner_test = rng.sample(sentences(root / "wikiann-en" / "test"), sizes["ner_eval"])
    (work / "wikiann_train.conll").write_text("\n\n".join(ner_train) + "\n")
    (work / "wikiann_test.conll").write_text("\n\n".join(ner_test) + "\n")

    alpaca = json.loads((root / "llamafactory-demo" / "alpaca_en_demo.json").read_text())
    rng.shuffle(alpaca)
    cut = len(alpaca) * 9 // 10
    (work / "alpaca_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca[:cut]))
    (work / "alpaca_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca[cut:]))
    return {
        "classification": {
            "data": work / "sst2_train.tsv", "eval": root / "sst2-glue" / "test.tsv",
            "extra": ["--text-field", "sentence"],
            "describe": f"SST-2: {len(sample)} sampled train sentences; eval sst2-glue/test.tsv (872)",
        },
        "ner": {
            "data": work / "wikiann_train.conll", "eval": work / "wikiann_test.conll", "extra": [],
            "describe": f"WikiANN-en: {len(ner_train)} train / {len(ner_test)} test sentences (sampled)",
        },
        "instruction": {
            "data": work / "alpaca_train.jsonl", "eval": work / "alpaca_eval.jsonl", "extra": [],
            "describe": f"alpaca demo: {cut} train / {len(alpaca) - cut} eval conversations",
        },
    }  # fmt: skip


def run_one(
    task: str, method: str, data: dict[str, Any], scale: float, registry: Path, threads: int
) -> dict[str, Any]:
    """Train one task x method through the CLI and return its manifest metrics."""
    settings = SETTINGS[task]
    steps = max(1, int(settings["steps"] * scale))
    name = f"bench-{task}-{method}"
    command = [
        sys.executable, "-m", "trainers", task, "--base", "tiny", "--name", name,
        "--data", str(data["data"]), "--eval", str(data["eval"]), *data["extra"],
        "--method", method, "--max-steps", str(steps), "--batch-size", str(settings["batch_size"]),
        "--eval-batch-size", "64", "--max-length", str(settings["max_length"]),
        "--lr", str(settings["lr"][method]), "--registry", str(registry), "--seed", str(SEED),
        "--log-every", "10", "--no-progress", "--cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error"}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"task": task, "method": method, "error": done.stderr[-2000:]}
    manifest = json.loads(sorted((registry / name).glob("*/manifest.json"))[-1].read_text())
    return {
        "task": task, "method": method, "steps": steps, "lr": settings["lr"][method],
        "metrics": manifest["metrics"], "wall_seconds": round(wall, 1),
    }  # fmt: skip


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results table."""
    lines = [
        "# Training quality (tiny base, randomly initialised, CPU)",
        "",
        f"Generated by `benchmarks/train_quality.py` on {meta['date']} ({meta['machine']}, "
        f"{meta['threads']} torch thread(s), scale {meta['scale']}). Data:",
        "",
        *[f"- {line}" for line in meta["data"]],
        "",
        "| task | method | metric | trained | baseline | untrained | trainable params | steps | "
        "train s | peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        if "error" in row:
            lines.append(f"| {row['task']} | {row['method']} | error | | | | | | | |")
            continue
        m, key = row["metrics"], PRIMARY[row["task"]]
        baseline = {
            "classification": m.get("majority_accuracy"), "ner": m.get("all_o_f1"),
            "instruction": m.get("baseline_loss"),
        }[row["task"]]  # fmt: skip
        name = {"classification": "accuracy (vs majority)", "ner": "entity F1 (vs all-O)",
                "instruction": "eval loss (vs untrained)"}[row["task"]]  # fmt: skip
        lines.append(
            f"| {row['task']} | {row['method']} | {name} | {m[key]:.4f} | {baseline:.4f} | "
            f"{m.get('baseline_' + key, float('nan')):.4f} | {m['trainable_params']:,} | "
            f"{m['train_steps']} | {m['train_seconds']:.0f} | {m['peak_memory_mb']:.0f} |"
        )
    extra = [
        "",
        "Other metrics per run (macro-F1, precision/recall, perplexity) are in train_quality.json.",
        "'untrained' is the same model evaluated before its first step (adapter at init, head random).",
    ]
    return "\n".join(lines + extra) + "\n"


def combine(paths: list[Path], out: Path) -> int:
    """Merge result files of separate invocations (e.g. tasks run side by side) into one."""
    parts = [json.loads(path.read_text()) for path in paths]
    meta = dict(parts[0]["meta"])
    meta["data"] = list(dict.fromkeys(line for part in parts for line in part["meta"]["data"]))
    if len({part["meta"]["scale"] for part in parts}) > 1:
        meta["scale"] = "mixed: see the steps column"
    results = [row for part in parts for row in part["results"]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_quality.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (out / "train_quality.md").write_text(markdown(results, meta))
    print(markdown(results, meta))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply every run's steps.")
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per run.")
    parser.add_argument("--train-size", type=int, default=4000, help="Sampled SST-2/WikiANN train rows.")
    parser.add_argument("--ner-eval-size", type=int, default=500)
    parser.add_argument(
        "--combine", nargs="+", type=Path, help="Only merge earlier train_quality.json files."
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out)
    sizes = {"classification": args.train_size, "ner": args.train_size, "ner_eval": args.ner_eval_size}
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="train-quality-") as tmp:
        work = Path(tmp)
        data = prepare_data(args.data_root, work, sizes)
        for task in args.tasks:
            for method in args.methods:
                row = run_one(task, method, data[task], args.scale, work / "registry", args.threads)
                results.append(row)
                print(json.dumps(row)[:400], flush=True)
                args.out.mkdir(parents=True, exist_ok=True)  # partial results survive a kill
                (args.out / "train_quality.partial.json").write_text(json.dumps(results, indent=2))
    meta = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": args.threads, "scale": args.scale, "seed": SEED,
        "data": [data[t]["describe"] for t in args.tasks], "settings": SETTINGS,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_quality.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=2) + "\n"
    )
    (args.out / "train_quality.md").write_text(markdown(results, meta))
    print(markdown(results, meta))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Training quality benchmark: each task x method on real data, on the real base (`smollm2-135m`) or a toy.

Trains through the real CLI (`python -m trainers TASK ...`, one subprocess per run so peak memory
is per run) on the shared data sets, then reads the registered manifests:

- classification: SST-2 (`sst2-glue/train.tsv`, a seeded sample), scored on `sst2-glue/test.tsv`
  (the GLUE dev set, 872 sentences) -- accuracy / macro-F1 vs the majority class.
- ner: WikiANN-en (`wikiann-en/train`, a seeded sample; the `en:` prefix stripped), scored on a
  seeded sample of `wikiann-en/test` -- seqeval entity F1 vs the untrained model (all-O scores 0).
- instruction: the alpaca demo set (`llamafactory-demo/alpaca_en_demo.json`), a seeded 90/10
  split -- eval loss / perplexity on assistant tokens vs the untrained adapter.

Settings are per base (`SETTINGS`) and the same for every method but the learning rate; they were
fixed before the held-out runs. `--select` scores classification on `sst2-glue/dev.tsv` instead (872
seeded sentences), the only split settings may be chosen on; nothing is tuned on the test splits.
The reserved folders named in ../shared/data/README.md are never read.

Run: `python benchmarks/train_quality.py [--base smollm2-135m] [--tasks classification ner]
[--methods lora full] [--scale 0.5] [--threads 1]`; writes benchmarks/results/train_quality_<base>.{json,md}
(`train_quality.{json,md}` for `--base tiny`, the first round's toy numbers).
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

# Per base and task: optimizer steps, batch size, max length, LoRA rank and per-method learning rates.
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {  # randomly initialised: high rates
        "classification": {
            "steps": 150, "batch_size": 32, "max_length": 64, "rank": 8,
            "lr": {"lora": 2e-3, "qlora": 2e-3, "bottleneck": 3e-3, "full": 3e-4},
        },
        "ner": {
            "steps": 150, "batch_size": 16, "max_length": 64, "rank": 8,
            "lr": {"lora": 2e-3, "qlora": 2e-3, "bottleneck": 3e-3, "full": 3e-4},
        },
        "instruction": {
            "steps": 60, "batch_size": 8, "max_length": 256, "rank": 8,
            "lr": {"lora": 2e-3, "qlora": 2e-3, "bottleneck": 3e-3, "full": 3e-4},
        },
    },
    "smollm2-135m": {  # pretrained: the usual LoRA rates, a tenth of that for full fine-tuning
        "classification": {
            "steps": 300, "batch_size": 16, "max_length": 64, "rank": 16,
            "lr": {"lora": 1e-3, "qlora": 1e-3, "bottleneck": 1e-3, "full": 5e-5},
        },
        "ner": {
            "steps": 200, "batch_size": 16, "max_length": 48, "rank": 16,
            "lr": {"lora": 1e-3, "qlora": 1e-3, "bottleneck": 1e-3, "full": 1e-4},
        },
        "instruction": {
            "steps": 60, "batch_size": 8, "max_length": 256, "rank": 16,
            "lr": {"lora": 2e-4, "qlora": 2e-4, "bottleneck": 5e-4, "full": 2e-5},
        },
    },
}  # fmt: skip
PRIMARY = {"classification": "accuracy", "ner": "f1", "instruction": "loss"}


def prepare_data(root: Path, work: Path, sizes: dict[str, int], select: bool) -> dict[str, dict[str, Any]]:
    """Write the benchmark's train/eval files into `work`; returns paths and descriptions."""
    rng = random.Random(SEED)
    sst_train = (root / "sst2-glue" / "train.tsv").read_text().splitlines()
    header, rows = sst_train[0], sst_train[1:]
    sample = rng.sample(rows, sizes["classification"])
    (work / "sst2_train.tsv").write_text("\n".join([header, *sample]) + "\n")
    sst_eval, sst_eval_name = root / "sst2-glue" / "test.tsv", "sst2-glue/test.tsv (872)"
    if select:  # choosing settings: a seeded slice of the dev split, never the test split
        dev = (root / "sst2-glue" / "dev.tsv").read_text().splitlines()
        (work / "sst2_select.tsv").write_text(
            "\n".join([dev[0], *random.Random(1).sample(dev[1:], 872)]) + "\n"
        )
        sst_eval, sst_eval_name = (
            work / "sst2_select.tsv",
            "872 seeded sst2-glue/dev.tsv sentences (--select)",
        )

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
            "data": work / "sst2_train.tsv", "eval": sst_eval,
            "extra": ["--text-field", "sentence"],
            "describe": f"SST-2: {len(sample)} sampled train sentences; eval {sst_eval_name}",
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
    base: str, task: str, method: str, data: dict[str, Any], scale: float, registry: Path, threads: int
) -> dict[str, Any]:
    """Train one task x method through the CLI and return its manifest metrics."""
    settings = SETTINGS[base][task]
    steps = max(1, int(settings["steps"] * scale))
    name = f"bench-{task}-{method}"
    command = [
        sys.executable, "-m", "trainers", task, "--base", base, "--name", name,
        "--rank", str(settings["rank"]),
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
        "precision": manifest["trainer"].get("compute_precision", "fp32"),
    }  # fmt: skip


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The results table."""
    command = meta.get("command") or f"benchmarks/train_quality.py --base {meta.get('base', 'tiny')}"
    lines = [
        f"# Training quality ({meta.get('base', 'tiny')} base, CPU)",
        "",
        f"Generated by `{command}` on {meta['date']} "
        f"({meta['machine']}, {meta['threads']} torch thread(s), scale {meta['scale']}). Data:",
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


def results_stem(base: str) -> str:
    """`train_quality` for the toy of the first round, `train_quality_<base>` for every other base."""
    return "train_quality" if base == "tiny" else f"train_quality_{base}"


def combine(paths: list[Path], out: Path) -> int:
    """Merge result files of separate invocations (e.g. tasks run side by side) into one."""
    parts = [json.loads(path.read_text()) for path in paths]
    meta = dict(parts[0]["meta"])
    meta["data"] = list(dict.fromkeys(line for part in parts for line in part["meta"]["data"]))
    if len({part["meta"]["scale"] for part in parts}) > 1:
        meta["scale"] = "mixed: see the steps column"
    results = [row for part in parts for row in part["results"]]
    out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(meta.get("base", "tiny"))
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(results, meta))
    print(markdown(results, meta))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2-135m", choices=sorted(SETTINGS))
    parser.add_argument("--select", action="store_true", help="score classification on a dev slice")
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
    parser.add_argument("--name", help="file stem of the results (default: train_quality_<base>)")
    args = parser.parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out)
    sizes = {"classification": args.train_size, "ner": args.train_size, "ner_eval": args.ner_eval_size}
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="train-quality-") as tmp:
        work = Path(tmp)
        data = prepare_data(args.data_root, work, sizes, args.select)
        for task in args.tasks:
            for method in args.methods:
                row = run_one(
                    args.base, task, method, data[task], args.scale, work / "registry", args.threads
                )
                results.append(row)
                print(json.dumps(row)[:400], flush=True)
                args.out.mkdir(parents=True, exist_ok=True)  # partial results survive a kill
                partial = args.out / f"{args.name or results_stem(args.base)}.partial.json"
                partial.write_text(json.dumps(results, indent=2))
    meta = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "threads": args.threads, "scale": args.scale, "seed": SEED, "base": args.base,
        "select": args.select, "data": [data[t]["describe"] for t in args.tasks],
        "command": " ".join(["python benchmarks/train_quality.py", *(argv or sys.argv[1:])]),
        "settings": SETTINGS[args.base],
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or results_stem(args.base) + ("_select" if args.select else "")
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(results, meta))
    print(markdown(results, meta))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

"""What a DoRA row and a weighted-set row cost in the engine, against a plain LoRA row, on one base.

One engine (unquantized, like the CPU serving benchmark) holds a plain LoRA (rank 8), a DoRA adapter (rank
8), a weighted set of two rank-8 LoRAs (served as one rank-16 LoRA) and, for reference, a plain rank-16
LoRA; all target every block linear and are made with PEFT. Two batch shapes are timed:

- `solo`: one row of that kind (the whole batch shares one adapter: the plain-matmul path);
- `mixed`: 8 rows, 4 of that kind beside 2 rows of another LoRA and 2 base rows (the per-row path).

Each block runs one prefill and `--steps` decode steps per kind, kinds interleaved block by block so they
see the same contention on a shared machine; CPU time (`time.process_time`) per call, medians over blocks.
The report gives each kind's decode step and prefill against the plain LoRA's (`ratio`) and, for `solo`,
its adapter overhead over the base (step minus the base's step) against the LoRA's; in `mixed` the
"base" kind means 4 base rows beside the same 4 other rows. Run from the root:
    OMP_NUM_THREADS=1 python -m benchmarks.adapter_kinds_cost --base small \\
        --out benchmarks/results/adapter_kinds_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.engine_timing import time_block
from hub.bases import resolve_base
from hub.store import LocalStore

KINDS = ("base", "lora", "dora", "set", "lora-r16")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_path: Path, out: Path, *, r: int, seed: int, use_dora: bool = False) -> Path:
    """A PEFT adapter with random non-zero factors (and jittered DoRA magnitudes), saved to `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_path)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, init_lora_weights=False,
                        use_dora=use_dora, task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "magnitude" in name:
                param.mul_(1 + 0.1 * torch.randn_like(param))
            elif "lora_" in name:
                param.mul_(0.1)
    peft_model.save_pretrained(out)
    return out


def load_kinds(engine: Any, store: LocalStore) -> dict[str, int]:
    """Load every kind into the engine; -> kind -> slot (0 for the base)."""

    def one(name: str):
        stored = store.get(name)
        return stored.manifest.ref, stored.path, stored.manifest

    slots = {"base": 0}
    for kind, name in (("lora", "lora"), ("dora", "dora"), ("lora-r16", "lora-r16"), ("other", "other")):
        slots[kind] = engine.load_adapter(*one(name)).slot
    parts = [(*one(name), 0.5) for name in ("lora", "part")]
    slots["set"] = engine.load_adapter_set("set", parts).slot
    return slots


def median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def measure(engine: Any, slots: dict[str, int], shape: str, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved blocks of every kind in one batch shape; -> per kind medians (ms) and ratios."""

    def batch(kind: str) -> list[int]:
        if shape == "solo":
            return [slots[kind]]
        return [slots[kind]] * 4 + [slots["other"]] * 2 + [0] * 2

    size = len(batch("lora"))
    prompts = [[5 + (i * 7 + j) % 300 for j in range(args.prompt_len)] for i in range(size)]
    decode: dict[str, list[float]] = {kind: [] for kind in KINDS}
    prefill: dict[str, list[float]] = {kind: [] for kind in KINDS}
    for block in range(args.blocks + 1):
        for kind in KINDS:
            p, d = time_block(engine, batch(kind), prompts, args.steps)
            if block:  # the first block warms every path up
                prefill[kind].append(p)
                decode[kind].append(median(d))
    med = {kind: (median(decode[kind]), median(prefill[kind])) for kind in KINDS}
    base_step, lora_step = med["base"][0], med["lora"][0]
    report = {}
    for kind in KINDS:
        step, pre = med[kind]
        report[kind] = {
            "decode_ms": round(step * 1e3, 3),
            "prefill_ms": round(pre * 1e3, 3),
            "decode_ratio_vs_lora": round(step / lora_step, 3),
            "prefill_ratio_vs_lora": round(pre / med["lora"][1], 3),
        }
        if shape == "solo" and kind != "base":  # in `mixed` every kind shares the batch's per-row work
            report[kind]["overhead_ratio_vs_lora"] = round((step - base_step) / (lora_step - base_step), 3)
    return {"batch": size, "kinds": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", default="small")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per block")
    parser.add_argument("--blocks", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here too")
    args = parser.parse_args()

    from server.engine import Engine

    base = resolve_base(args.base)
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(Path(tmp) / "registry")
        made = {"lora": (8, 1, False), "part": (8, 2, False), "other": (8, 3, False),
                "dora": (8, 4, True), "lora-r16": (16, 5, False)}  # fmt: skip
        for name, (r, seed, dora) in made.items():
            folder = make_adapter(base.path, Path(tmp) / name, r=r, seed=seed, use_dora=dora)
            store.put(
                folder, name=name, task="instruction", method="dora" if dora else "lora", base=base.spec
            )
        engine = Engine(base.path, base_name=args.base, quantize="none", max_adapters=8, max_rank=16,
                        max_batch_size=8, max_seq_len=args.prompt_len + args.steps + 8)  # fmt: skip
        slots = load_kinds(engine, store)
        result = {
            "base": args.base,
            "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(),
            "prompt_len": args.prompt_len,
            "decode_steps": args.steps,
            "blocks": args.blocks,
            "load_average_at_start": round(os.getloadavg()[0], 2),
            "set": "lora@1*0.5+part@1*0.5 (two rank-8 LoRAs: one rank-16 slot)",
            "shapes": {shape: measure(engine, slots, shape, args) for shape in ("solo", "mixed")},
        }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

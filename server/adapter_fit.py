"""Does an adapter fit the served base and the engine's slots? Every tensor name and shape, from the header.

Boundary: headers and configs only, no torch: `plan_adapter` reads an adapter's safetensors header and
config, checks each tensor against the base's `BaseLayout` (and `--max-rank`), and says which tensor goes
where with its scale, or raises BEFORE any tensor data is read. The format's rules (header limits, tensor
names, PEFT options, bottleneck schema, pickles) are `hub.adapter_format`'s and its siblings'
(`hub.safetensors_header`, `hub.peft_config`, `hub.bottleneck_format`); reading the tensors is
`server.adapter_weights`'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hub.adapter_format import (
    ADAPTER_CONFIG,
    BOTTLENECK_CONFIG,
    REEXPORT,
    load_config,
    refuse_pickles,
    weights_file,
)
from hub.bottleneck_format import (
    BOTTLENECK_FIX,
    BOTTLENECK_KEY,
    check_bottleneck_config,
    check_bottleneck_fits,
)
from hub.errors import CorruptAdapterError
from hub.manifest import Manifest
from hub.peft_config import HEAD_KEY, LORA_KEY, check_peft_options, is_dora, lora_part, pattern_value
from hub.safetensors_header import TensorInfo, read_header

HEAD_TASKS = ("classification", "ner", "reward")


@dataclass(frozen=True)
class BaseLayout:
    """The shapes an adapter must fit: hidden size, depth, and (in, out) of every target linear."""

    hidden_size: int
    num_layers: int
    linears: dict[str, tuple[int, int]]
    """Module path (`model.layers.0.self_attn.q_proj`) -> (in_features, out_features)."""

    @classmethod
    def from_config(cls, config: Any) -> BaseLayout:
        """Derive the layout from a transformers config of a supported decoder (`server.attention`).

        Every supported family names its block linears like Llama (q/k/v/o, gate/up/down), except
        Phi-3, whose fused `qkv_proj` and `gate_up_proj` are one linear each, and so one LoRA target
        each in PEFT (B spans the fused output).
        """
        hidden, inter = config.hidden_size, config.intermediate_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        if getattr(config, "model_type", None) == "phi3":
            shapes = {
                "self_attn.qkv_proj": (hidden, q_out + 2 * kv_out),
                "self_attn.o_proj": (q_out, hidden),
                "mlp.gate_up_proj": (hidden, 2 * inter),
                "mlp.down_proj": (inter, hidden),
            }
        else:
            shapes = {
                "self_attn.q_proj": (hidden, q_out),
                "self_attn.k_proj": (hidden, kv_out),
                "self_attn.v_proj": (hidden, kv_out),
                "self_attn.o_proj": (q_out, hidden),
                "mlp.gate_proj": (hidden, inter),
                "mlp.up_proj": (hidden, inter),
                "mlp.down_proj": (inter, hidden),
            }
        linears = {
            f"model.layers.{i}.{name}": shape
            for i in range(config.num_hidden_layers)
            for name, shape in shapes.items()
        }
        return cls(hidden_size=hidden, num_layers=config.num_hidden_layers, linears=linears)


@dataclass(frozen=True)
class LoraPlan:
    """One target linear's LoRA: the names of its factors in the file, its rank and its scale."""

    a: str
    b: str
    rank: int
    scale: float
    """lora_alpha / rank (or / sqrt(rank) with rsLoRA), after alpha_pattern and rank_pattern."""
    magnitude: str | None = None
    """DoRA's `lora_magnitude_vector` [out_features] (None: plain LoRA)."""


@dataclass
class AdapterPlan:
    """A checked adapter: where its tensors are in the file and what each one is for."""

    method: str
    """"lora", "dora" or "bottleneck"."""
    path: Path
    """The adapter_model.safetensors file."""
    infos: dict[str, TensorInfo]
    """Every tensor of the file (all of them are used)."""
    data_start: int
    lora: dict[str, LoraPlan] = field(default_factory=dict)
    """Module path -> its factors."""
    bottleneck: dict[tuple[int, str], dict[str, str]] = field(default_factory=dict)
    """(layer, "attn" | "mlp") -> "down.weight", "down.bias", "up.weight", "up.bias" -> tensor name."""
    bottleneck_size: int = 0
    activation: str = ""
    head: dict[str, str] = field(default_factory=dict)
    """"weight" (and "bias") -> tensor name of the task head, if the task has one."""


def plan_adapter(folder: Path, manifest: Manifest, layout: BaseLayout, *, max_rank: int) -> AdapterPlan:
    """Check one registered adapter version against the base and the slots, reading headers only.

    Args:
        folder: the version folder (beside its manifest.json).
        manifest: its manifest (task, labels, format, files).
        layout: the shapes of the served base.
        max_rank: the largest LoRA rank the engine's slots hold.

    Raises:
        CorruptAdapterError: missing, pickled, truncated or malformed files; tensors that do
            not fit; unsupported PEFT options.
        BaseMismatchError: a bottleneck adapter built for another hidden size or depth.
    """
    folder = Path(folder)
    _check_files(folder, manifest)
    if manifest.adapter_format == "peft":
        return _plan_peft(folder, manifest, layout, max_rank)
    if manifest.adapter_format == "bottleneck":
        return _plan_bottleneck(folder, manifest, layout)
    raise CorruptAdapterError(
        f"{folder}: adapter_format {manifest.adapter_format!r} is not a swappable adapter.",
        "Serve a full fine-tuned model as the base: `adapterdock serve --base registry:NAME`.",
    )


def _check_files(folder: Path, manifest: Manifest) -> None:
    if not folder.is_dir():
        raise CorruptAdapterError(
            f"Adapter folder {folder} does not exist.", "Re-register or re-pull the adapter."
        )
    refuse_pickles(folder)
    missing = sorted(name for name in manifest.files if not (folder / name).is_file())
    if missing:
        raise CorruptAdapterError(
            f"{folder} is missing file(s) listed in its manifest: {', '.join(missing)}.",
            "Re-register or re-pull the adapter.",
        )


def _plan_peft(folder: Path, manifest: Manifest, layout: BaseLayout, max_rank: int) -> AdapterPlan:
    config_path = folder / ADAPTER_CONFIG
    config = load_config(config_path)
    check_peft_options(config_path, config)
    path = weights_file(folder)
    infos, data_start = read_header(path)
    factors: dict[str, dict[str, tuple[str, TensorInfo]]] = {}
    head: dict[str, tuple[str, TensorInfo]] = {}
    dora = is_dora(config)
    parts_allowed = ("A", "B", "magnitude_vector") if dora else ("A", "B")
    for name, info in infos.items():
        if head_match := HEAD_KEY.match(name):
            head[head_match["p"]] = (name, info)
            continue
        match = LORA_KEY.match(name)
        if not match or lora_part(match) not in parts_allowed:
            raise CorruptAdapterError(
                f"{path}: tensor {name!r} is not a LoRA factor of a block linear layer nor the task head.",
                "The server applies LoRA to the blocks' attention and MLP projections only "
                "(q/k/v/o, gate/up/down, or Phi-3's fused qkv_proj/gate_up_proj); retrain with those "
                "target_modules.",
            )
        if match["module"] not in layout.linears:
            raise CorruptAdapterError(
                f"{path}: tensor {name!r} targets {match['module']!r}, which is no linear "
                "layer of this base.",
                "The adapter was made for another architecture or depth; use the base it was trained on.",
            )
        factors.setdefault(match["module"], {})[lora_part(match)] = (name, info)
    if not factors:
        raise CorruptAdapterError(f"{path} holds no LoRA tensors.", REEXPORT)
    ranks = _check_lora_shapes(path, factors, layout, config, max_rank)
    _check_head(path, manifest, head, layout.hidden_size)
    method = "dora" if dora else "lora"
    plan = AdapterPlan(method=method, path=path, infos=infos, data_start=data_start, head=_names(head))
    alpha = float(config.get("lora_alpha", 8))
    for module, parts in factors.items():
        r = ranks[module]
        module_alpha = pattern_value(config.get("alpha_pattern", {}), module, alpha)
        denom = math.sqrt(r) if config.get("use_rslora") else r
        magnitude = parts["magnitude_vector"][0] if dora else None
        plan.lora[module] = LoraPlan(
            a=parts["A"][0], b=parts["B"][0], rank=r, scale=module_alpha / denom, magnitude=magnitude
        )
    return plan


def _check_lora_shapes(
    path: Path,
    factors: dict[str, dict[str, tuple[str, TensorInfo]]],
    layout: BaseLayout,
    config: dict[str, Any],
    max_rank: int,
) -> dict[str, int]:
    """Check each module's A [r, in], B [out, r] (and DoRA's magnitude [out]) against base and config.

    Returns:
        module -> rank.
    """
    ranks: dict[str, int] = {}
    rank = int(config.get("r", 8))
    needed = {"A", "B", "magnitude_vector"} if is_dora(config) else {"A", "B"}
    for module, parts in sorted(factors.items()):
        missing = sorted(needed - set(parts))
        if missing:
            names = ", ".join(f"lora_{part}" for part in missing)
            raise CorruptAdapterError(f"{path}: {module} has no {names} tensor.", REEXPORT)
        in_features, out_features = layout.linears[module]
        r = int(pattern_value(config.get("rank_pattern", {}), module, rank))
        expected = {"A": (r, in_features), "B": (out_features, r), "magnitude_vector": (out_features,)}
        for part, (name, info) in parts.items():
            if info.shape != expected[part]:
                raise CorruptAdapterError(
                    f"{path}: tensor {name!r} has shape {list(info.shape)}; rank {r} on this "
                    "base needs "
                    f"{list(expected[part])}.",
                    "The file does not match this base or its adapter_config.json. " + REEXPORT,
                )
        if r > max_rank:
            raise CorruptAdapterError(
                f"{path}: {module} has LoRA rank {r}, above the server's --max-rank {max_rank}.",
                f"Restart the server with --max-rank {r} or more, or retrain with a smaller rank.",
            )
        ranks[module] = r
    return ranks


def _check_head(path: Path, manifest: Manifest, head: dict[str, tuple[str, TensorInfo]], hidden: int) -> None:
    """A classification/NER/reward adapter needs `score.weight` [labels, hidden]; others none."""
    if manifest.task not in HEAD_TASKS:
        if head:
            raise CorruptAdapterError(
                f"{path}: a {manifest.task} adapter carries a task head "
                f"({', '.join(n for n, _ in head.values())}).",
                "Register it with its real task (classification, ner or reward), or drop the head.",
            )
        return
    num_labels = 1 if manifest.task == "reward" else len(manifest.labels)
    if "weight" not in head:
        raise CorruptAdapterError(
            f"{path}: the {manifest.task} adapter has no task head (score.weight).",
            "Train with modules_to_save=['score'] so the head is saved beside the LoRA factors.",
        )
    expected = {"weight": (num_labels, hidden), "bias": (num_labels,)}
    for part, (name, info) in head.items():
        if info.shape != expected[part]:
            raise CorruptAdapterError(
                f"{path}: tensor {name!r} has shape {list(info.shape)}; {num_labels} label(s) "
                f"on hidden size {hidden} need {list(expected[part])}.",
                "The manifest's labels and the saved head disagree, or the adapter is for "
                "another base. " + REEXPORT,
            )


def _names(found: dict[str, tuple[str, TensorInfo]]) -> dict[str, str]:
    return {part: name for part, (name, _) in found.items()}


def _plan_bottleneck(folder: Path, manifest: Manifest, layout: BaseLayout) -> AdapterPlan:
    config_path = folder / BOTTLENECK_CONFIG
    config = load_config(config_path)
    check_bottleneck_config(config, config_path)
    check_bottleneck_fits(config, layout.hidden_size, layout.num_layers, str(config_path))
    variant, activation, size = config["variant"], config["non_linearity"], config["bottleneck_size"]
    path = weights_file(folder)
    infos, data_start = read_header(path)
    sites = {(i, "mlp") for i in range(layout.num_layers)}
    if variant == "houlsby":
        sites |= {(i, "attn") for i in range(layout.num_layers)}
    found: dict[tuple[int, str], dict[str, str]] = {}
    head: dict[str, tuple[str, TensorInfo]] = {}
    for name, info in infos.items():
        if head_match := HEAD_KEY.match(name):
            head[head_match["p"]] = (name, info)
            continue
        match = BOTTLENECK_KEY.match(name)
        site = (int(match["layer"]), match["site"]) if match else None
        if site not in sites:
            raise CorruptAdapterError(
                f"{path}: tensor {name!r} is not part of a {variant} bottleneck adapter "
                f"on {layout.num_layers} layers.",
                BOTTLENECK_FIX,
            )
        key = f"{match['proj']}.{match['p']}"
        expected = {
            "down.weight": (size, layout.hidden_size),
            "down.bias": (size,),
            "up.weight": (layout.hidden_size, size),
            "up.bias": (layout.hidden_size,),
        }[key]
        if info.shape != expected:
            raise CorruptAdapterError(
                f"{path}: tensor {name!r} has shape {list(info.shape)}, expected {list(expected)}.",
                BOTTLENECK_FIX,
            )
        found.setdefault(site, {})[key] = name
    incomplete = sorted(s for s in sites if len(found.get(s, {})) != 4)
    if incomplete:
        layer, where = incomplete[0]
        raise CorruptAdapterError(
            f"{path}: layer {layer}'s {where} adapter is missing tensors (expected down/up weight and bias).",
            BOTTLENECK_FIX,
        )
    _check_head(path, manifest, head, layout.hidden_size)
    return AdapterPlan(
        method="bottleneck",
        path=path,
        infos=infos,
        data_start=data_start,
        bottleneck=found,
        bottleneck_size=size,
        activation=activation,
        head=_names(head),
    )

"""Read one adapter version folder into checked tensors: PEFT LoRA, bottleneck, and the task head.

Boundary: files in, tensors out. The format's rules (header limits, tensor names, PEFT options,
bottleneck schema, pickle refusal) are `hub.adapter_format`'s; this module checks each tensor against
the served base's layout and the slots' `--max-rank` BEFORE anything is allocated, then reads the
tensors. Every problem is a `CorruptAdapterError` naming the file and tensor and saying how to fix it.
Nothing here touches the model or the slot banks (that is `lora_batch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hub.adapter_format import (
    ADAPTER_CONFIG,
    BOTTLENECK_CONFIG,
    BOTTLENECK_FIX,
    BOTTLENECK_KEY,
    HEAD_KEY,
    LORA_KEY,
    REEXPORT,
    TensorInfo,
    check_bottleneck_config,
    check_bottleneck_fits,
    check_peft_options,
    load_config,
    pattern_value,
    read_header,
    refuse_pickles,
    weights_file,
)
from hub.errors import CorruptAdapterError
from hub.manifest import Manifest

TORCH_DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
"""`hub.adapter_format.ADAPTER_DTYPES` as torch dtypes."""
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
        """Derive the layout from a transformers `LlamaConfig`."""
        hidden, inter = config.hidden_size, config.intermediate_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
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


@dataclass
class LoraModule:
    """One target linear's LoRA factors: delta(x) = scale * (x @ a.T) @ b.T."""

    a: torch.Tensor
    """[rank, in_features]"""
    b: torch.Tensor
    """[out_features, rank]"""
    scale: float


@dataclass
class BottleneckSite:
    """One residual bottleneck: h + up(act(down(h)))."""

    down_weight: torch.Tensor
    """[size, hidden]"""
    down_bias: torch.Tensor
    """[size]"""
    up_weight: torch.Tensor
    """[hidden, size]"""
    up_bias: torch.Tensor
    """[hidden]"""


@dataclass
class AdapterWeights:
    """Everything an adapter contributes, as checked tensors (in the file's float dtype)."""

    method: str
    """"lora" or "bottleneck"."""
    lora: dict[str, LoraModule] = field(default_factory=dict)
    rank: int = 0
    """Largest LoRA rank over its modules (0 for bottleneck)."""
    bottleneck: dict[tuple[int, str], BottleneckSite] = field(default_factory=dict)
    """(layer, "attn" | "mlp") -> site."""
    bottleneck_size: int = 0
    activation: str = ""
    head_weight: torch.Tensor | None = None
    """[num_labels, hidden] task head (`score`), if the task has one."""
    head_bias: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held."""
        tensors: list[torch.Tensor] = [t for m in self.lora.values() for t in (m.a, m.b)]
        for site in self.bottleneck.values():
            tensors += [site.down_weight, site.down_bias, site.up_weight, site.up_bias]
        tensors += [t for t in (self.head_weight, self.head_bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


# ---- tensors ------------------------------------------------------------------------------------
def read_tensors(path: Path, infos: dict[str, TensorInfo], data_start: int) -> dict[str, torch.Tensor]:
    """Read the (already checked) tensors of `infos` from `path`.

    Raises:
        CorruptAdapterError: a tensor is truncated or holds NaN or infinite values.
    """
    tensors: dict[str, torch.Tensor] = {}
    with open(path, "rb") as handle:
        for name, info in infos.items():
            handle.seek(data_start + info.begin)
            buf = bytearray(handle.read(info.end - info.begin))
            if len(buf) != info.end - info.begin:
                raise CorruptAdapterError(f"{path}: tensor {name!r} is truncated.", REEXPORT)
            dtype = TORCH_DTYPES[info.dtype]
            flat = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
            if not bool(torch.isfinite(flat).all()):
                raise CorruptAdapterError(
                    f"{path}: tensor {name!r} holds NaN or infinite (non-finite) values.",
                    "The training run diverged or the file is damaged; retrain or re-export the adapter.",
                )
            tensors[name] = flat.reshape(info.shape)
    return tensors


# ---- folder -> tensors ---------------------------------------------------------------------------
def read_adapter(folder: Path, manifest: Manifest, layout: BaseLayout, *, max_rank: int) -> AdapterWeights:
    """Read and check one registered adapter version.

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
        return _read_peft(folder, manifest, layout, max_rank)
    if manifest.adapter_format == "bottleneck":
        return _read_bottleneck(folder, manifest, layout)
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


def _read_peft(folder: Path, manifest: Manifest, layout: BaseLayout, max_rank: int) -> AdapterWeights:
    config_path = folder / ADAPTER_CONFIG
    config = load_config(config_path)
    check_peft_options(config_path, config)
    path = weights_file(folder)
    infos, data_start = read_header(path)
    factors: dict[str, dict[str, tuple[str, TensorInfo]]] = {}
    head: dict[str, tuple[str, TensorInfo]] = {}
    for name, info in infos.items():
        if head_match := HEAD_KEY.match(name):
            head[head_match["p"]] = (name, info)
            continue
        match = LORA_KEY.match(name)
        if not match or match["part"] not in ("A", "B"):
            raise CorruptAdapterError(
                f"{path}: tensor {name!r} is not a LoRA factor of a block linear layer nor the task head.",
                "The server applies LoRA to the blocks' q/k/v/o/gate/up/down projections only; "
                "retrain with those target_modules.",
            )
        if match["module"] not in layout.linears:
            raise CorruptAdapterError(
                f"{path}: tensor {name!r} targets {match['module']!r}, which is no linear "
                "layer of this base.",
                "The adapter was made for another architecture or depth; use the base it was trained on.",
            )
        factors.setdefault(match["module"], {})[match["part"]] = (name, info)
    if not factors:
        raise CorruptAdapterError(f"{path} holds no LoRA tensors.", REEXPORT)
    ranks = _check_lora_shapes(path, factors, layout, config, max_rank)
    _check_head(path, manifest, head, layout.hidden_size)
    loaded = read_tensors(path, infos, data_start)
    weights = AdapterWeights(method="lora")
    alpha = float(config.get("lora_alpha", 8))
    for module, parts in factors.items():
        r = ranks[module]
        module_alpha = pattern_value(config.get("alpha_pattern", {}), module, alpha)
        denom = math.sqrt(r) if config.get("use_rslora") else r
        a, b = loaded[parts["A"][0]], loaded[parts["B"][0]]
        weights.lora[module] = LoraModule(a=a, b=b, scale=module_alpha / denom)
        weights.rank = max(weights.rank, r)
    _attach_head(weights, loaded, head)
    return weights


def _check_lora_shapes(
    path: Path,
    factors: dict[str, dict[str, tuple[str, TensorInfo]]],
    layout: BaseLayout,
    config: dict[str, Any],
    max_rank: int,
) -> dict[str, int]:
    """Check each module's A [r, in] and B [out, r] against base and config; -> ranks."""
    ranks: dict[str, int] = {}
    rank = int(config.get("r", 8))
    for module, parts in sorted(factors.items()):
        if set(parts) != {"A", "B"}:
            missing = "lora_B" if "A" in parts else "lora_A"
            raise CorruptAdapterError(f"{path}: {module} has no {missing} tensor.", REEXPORT)
        in_features, out_features = layout.linears[module]
        r = int(pattern_value(config.get("rank_pattern", {}), module, rank))
        expected = {"A": (r, in_features), "B": (out_features, r)}
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


def _attach_head(
    weights: AdapterWeights,
    loaded: dict[str, torch.Tensor],
    head: dict[str, tuple[str, TensorInfo]],
) -> None:
    if "weight" in head:
        weights.head_weight = loaded[head["weight"][0]]
    if "bias" in head:
        weights.head_bias = loaded[head["bias"][0]]


def _read_bottleneck(folder: Path, manifest: Manifest, layout: BaseLayout) -> AdapterWeights:
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
    loaded = read_tensors(path, infos, data_start)
    weights = AdapterWeights(method="bottleneck", bottleneck_size=size, activation=activation)
    for site, names in found.items():
        weights.bottleneck[site] = BottleneckSite(
            down_weight=loaded[names["down.weight"]],
            down_bias=loaded[names["down.bias"]],
            up_weight=loaded[names["up.weight"]],
            up_bias=loaded[names["up.bias"]],
        )
    _attach_head(weights, loaded, head)
    return weights

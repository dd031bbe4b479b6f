"""Read one adapter version folder into checked tensors: PEFT LoRA, bottleneck, and the task head.

Boundary: files in, tensors out. Safetensors only (pickles are refused), parsed here from the raw
header so that absurd headers, tensors larger than their file, or tensors that do not fit the base
are refused BEFORE anything is allocated. Every problem is a `CorruptAdapterError` naming the file
and tensor and saying how to fix it. Nothing here touches the model or the slot banks (that is
`lora_batch`).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hub.errors import BaseMismatchError, CorruptAdapterError
from hub.manifest import Manifest

MAX_HEADER_BYTES = 64 << 20
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ACTIVATIONS = ("relu", "gelu", "silu")
HEAD_TASKS = ("classification", "ner", "reward")
# PEFT options whose math the server does not implement: refuse rather than serve something else.
_UNSUPPORTED_PEFT = {
    "use_dora": "DoRA",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "BD-LoRA",
    "lora_bias": "LoRA bias",
    "fan_in_fan_out": "fan_in_fan_out",
    "alora_invocation_tokens": "activated LoRA",
    "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication",
    "target_parameters": "target_parameters",
}
_LORA_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>A|B|embedding_A|embedding_B|magnitude_vector)"
    r"(?:\.[^.]+)?\.weight$"
)
_HEAD_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:score|classifier)(?:\.modules_to_save\.[^.]+)?\.(?P<p>weight|bias)$"
)
_BOTTLENECK_KEY = re.compile(
    r"^layers\.(?P<layer>\d+)\.(?P<site>attn|mlp)_adapter\.(?P<proj>down|up)\.(?P<p>weight|bias)$"
)
_REEXPORT = "Re-export it with save_pretrained(..., safe_serialization=True) from the training run."


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


# ---- safetensors ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    """A tensor's entry in a safetensors header, validated against the file size."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: Path) -> tuple[dict[str, TensorInfo], int]:
    """Parse and check a safetensors header without reading tensor data.

    Returns:
        Tensor name -> info, and the offset where the data section starts.

    Raises:
        CorruptAdapterError: truncated file, absurd header, bad JSON, unknown dtype, or offsets
            outside the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise CorruptAdapterError(f"{path} is {size} bytes, too short for a safetensors file.", _REEXPORT)
        (length,) = struct.unpack("<Q", raw)
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise CorruptAdapterError(
                f"{path}: the safetensors header claims {length} bytes but the file has {size}; "
                "the file is truncated or damaged.",
                _REEXPORT,
            )
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptAdapterError(
                f"{path}: the safetensors header is not valid JSON ({exc}).", _REEXPORT
            ) from exc
    if not isinstance(header, dict):
        raise CorruptAdapterError(f"{path}: the safetensors header is not a JSON object.", _REEXPORT)
    data_size = size - 8 - length
    infos: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name != "__metadata__":
            infos[name] = _tensor_info(path, name, meta, data_size)
    return infos, 8 + length


def _tensor_info(path: Path, name: str, meta: Any, data_size: int) -> TensorInfo:
    try:
        dtype_name, shape, (begin, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
        shape = tuple(int(d) for d in shape)
        begin, end = int(begin), int(end)
    except (TypeError, KeyError, ValueError) as exc:
        raise CorruptAdapterError(
            f"{path}: tensor {name!r} has a malformed header entry.", _REEXPORT
        ) from exc
    if dtype_name not in SAFETENSORS_DTYPES:
        raise CorruptAdapterError(
            f"{path}: tensor {name!r} has dtype {dtype_name}; adapter weights must be F32, F16 or BF16.",
            _REEXPORT,
        )
    dtype, itemsize = SAFETENSORS_DTYPES[dtype_name]
    if any(d < 0 for d in shape) or not 0 <= begin <= end <= data_size:
        raise CorruptAdapterError(
            f"{path}: tensor {name!r} spans bytes {begin}..{end} but the data section has "
            f"{data_size}; "
            "the file is truncated or damaged.",
            _REEXPORT,
        )
    if end - begin != math.prod(shape) * itemsize:
        raise CorruptAdapterError(
            f"{path}: tensor {name!r} of shape {list(shape)} ({dtype_name}) needs "
            f"{math.prod(shape) * itemsize} bytes, its header gives {end - begin}.",
            _REEXPORT,
        )
    return TensorInfo(dtype=dtype, shape=shape, begin=begin, end=end)


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
                raise CorruptAdapterError(f"{path}: tensor {name!r} is truncated.", _REEXPORT)
            flat = torch.frombuffer(buf, dtype=info.dtype) if buf else torch.empty(0, dtype=info.dtype)
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
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise CorruptAdapterError(
            f"{folder} contains pickle file(s) {', '.join(pickles)}; adapterdock never loads pickles.",
            "Convert to safetensors (save_pretrained(..., safe_serialization=True)), then re-register.",
        )
    missing = sorted(name for name in manifest.files if not (folder / name).is_file())
    if missing:
        raise CorruptAdapterError(
            f"{folder} is missing file(s) listed in its manifest: {', '.join(missing)}.",
            "Re-register or re-pull the adapter.",
        )


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CorruptAdapterError(f"{path} is missing.", _REEXPORT) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptAdapterError(f"{path} is not readable JSON: {exc}.", _REEXPORT) from exc
    if not isinstance(data, dict):
        raise CorruptAdapterError(f"{path} is not a JSON object.", _REEXPORT)
    return data


def _weights_file(folder: Path) -> Path:
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise CorruptAdapterError(
            f"{folder} has no adapter_model.safetensors.",
            "Save with save_pretrained(..., safe_serialization=True); pickled .bin files are refused.",
        )
    return path


def _check_peft_config(path: Path, config: dict[str, Any]) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise CorruptAdapterError(
            f"{path}: PEFT type {config.get('peft_type')!r} is not supported; the server "
            "swaps LoRA adapters.",
            "Train a LoRA (or QLoRA) adapter.",
        )
    used = [label for key, label in _UNSUPPORTED_PEFT.items() if config.get(key)]
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']!r}")
    extra = [m for m in config.get("modules_to_save") or [] if m not in ("score", "classifier")]
    if extra:
        used.append(f"modules_to_save {extra}")
    if used:
        raise CorruptAdapterError(
            f"{path}: the server does not implement {', '.join(used)}.",
            "Retrain with plain LoRA options (no DoRA, bias='none', only the task head in modules_to_save).",
        )


def _pattern_value(pattern: dict[str, Any], module: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: a key (regex) matches a path's end."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return float(value)
    return default


def _read_peft(folder: Path, manifest: Manifest, layout: BaseLayout, max_rank: int) -> AdapterWeights:
    config_path = folder / "adapter_config.json"
    config = _load_json(config_path)
    _check_peft_config(config_path, config)
    path = _weights_file(folder)
    infos, data_start = read_header(path)
    factors: dict[str, dict[str, tuple[str, TensorInfo]]] = {}
    head: dict[str, tuple[str, TensorInfo]] = {}
    for name, info in infos.items():
        if head_match := _HEAD_KEY.match(name):
            head[head_match["p"]] = (name, info)
            continue
        match = _LORA_KEY.match(name)
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
        raise CorruptAdapterError(f"{path} holds no LoRA tensors.", _REEXPORT)
    ranks = _check_lora_shapes(path, factors, layout, config, max_rank)
    _check_head(path, manifest, head, layout.hidden_size)
    loaded = read_tensors(path, infos, data_start)
    weights = AdapterWeights(method="lora")
    alpha = float(config.get("lora_alpha", 8))
    for module, parts in factors.items():
        r = ranks[module]
        module_alpha = _pattern_value(config.get("alpha_pattern", {}), module, alpha)
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
            raise CorruptAdapterError(f"{path}: {module} has no {missing} tensor.", _REEXPORT)
        in_features, out_features = layout.linears[module]
        r = int(_pattern_value(config.get("rank_pattern", {}), module, rank))
        expected = {"A": (r, in_features), "B": (out_features, r)}
        for part, (name, info) in parts.items():
            if info.shape != expected[part]:
                raise CorruptAdapterError(
                    f"{path}: tensor {name!r} has shape {list(info.shape)}; rank {r} on this "
                    "base needs "
                    f"{list(expected[part])}.",
                    "The file does not match this base or its adapter_config.json. " + _REEXPORT,
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
                "another base. " + _REEXPORT,
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
    config_path = folder / "bottleneck_config.json"
    config = _load_json(config_path)
    variant, activation = config.get("variant"), config.get("non_linearity")
    size = config.get("bottleneck_size")
    problems = []
    if variant not in ("houlsby", "pfeiffer"):
        problems.append(f"variant {variant!r} is not houlsby or pfeiffer")
    if activation not in ACTIVATIONS:
        problems.append(f"non_linearity {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    if not isinstance(size, int) or size < 1:
        problems.append(f"bottleneck_size {size!r} is not a positive integer")
    if problems:
        raise CorruptAdapterError(f"{config_path}: " + "; ".join(problems) + ".", _BOTTLENECK_FIX)
    if config.get("hidden_size") != layout.hidden_size or config.get("num_layers") != layout.num_layers:
        raise BaseMismatchError(
            f"{config_path}: made for hidden size {config.get('hidden_size')} and "
            f"{config.get('num_layers')} "
            f"layers; this base has {layout.hidden_size} and {layout.num_layers}."
        )
    path = _weights_file(folder)
    infos, data_start = read_header(path)
    sites = {(i, "mlp") for i in range(layout.num_layers)}
    if variant == "houlsby":
        sites |= {(i, "attn") for i in range(layout.num_layers)}
    found: dict[tuple[int, str], dict[str, str]] = {}
    head: dict[str, tuple[str, TensorInfo]] = {}
    for name, info in infos.items():
        if head_match := _HEAD_KEY.match(name):
            head[head_match["p"]] = (name, info)
            continue
        match = _BOTTLENECK_KEY.match(name)
        site = (int(match["layer"]), match["site"]) if match else None
        if site not in sites:
            raise CorruptAdapterError(
                f"{path}: tensor {name!r} is not part of a {variant} bottleneck adapter "
                f"on {layout.num_layers} layers.",
                _BOTTLENECK_FIX,
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
                _BOTTLENECK_FIX,
            )
        found.setdefault(site, {})[key] = name
    incomplete = sorted(s for s in sites if len(found.get(s, {})) != 4)
    if incomplete:
        layer, where = incomplete[0]
        raise CorruptAdapterError(
            f"{path}: layer {layer}'s {where} adapter is missing tensors (expected down/up weight and bias).",
            _BOTTLENECK_FIX,
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


_BOTTLENECK_FIX = "Re-export the bottleneck adapter with adapterdock's trainer (see docs/training.md)."

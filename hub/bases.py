"""Base models: the built-in `tiny` and `small` Llamas, name resolution, and the base fingerprint.

A base is named by a built-in name, a local HF-format folder, `registry:NAME[@VERSION]` (a full
fine-tune in the registry) or an HF model id (taken from the local HF cache). Built-ins are made
locally and deterministically (fixed seeds, a BPE tokenizer trained on the shipped
`builtin/corpus.txt`), so nothing is downloaded.
Boundary: numpy, safetensors and tokenizers only; no torch. The fingerprint identifies exact weights
cheaply (config, safetensors headers and the weight bytes, sampled for large models).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hub.errors import BaseNotFoundError, CorruptAdapterError
from hub.manifest import BaseSpec

logger = logging.getLogger(__name__)

CACHE_ENV = "ADAPTERDOCK_CACHE"
BUILTIN_VERSION = 1
SEED = 1234
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
PAD, BOS, EOS_TEXT, IM_START, IM_END = range(len(SPECIAL_TOKENS))
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>' + '\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
BUILTIN_BASES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4),
}  # fmt: skip
VOCAB_SIZE = 4096
MAX_POSITIONS = 1024
_FULL_HASH_LIMIT = 256 << 20
_SAMPLE_CHUNKS, _CHUNK = 64, 64 << 10


@dataclass(frozen=True)
class BaseInfo:
    """A resolved base model: the name it was asked by, its folder, and its fingerprint."""

    name_or_path: str
    path: Path
    fingerprint: str

    @property
    def spec(self) -> BaseSpec:
        """What a manifest records about this base."""
        return BaseSpec(name_or_path=self.name_or_path, fingerprint=self.fingerprint)


def bases_cache_dir() -> Path:
    """Where built-ins are built once: `$ADAPTERDOCK_CACHE/bases`, else `~/.cache/adapterdock/bases`."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "adapterdock"
    return Path(root) / "bases"


# ---- building the built-ins -------------------------------------------------------------------
def llama_config(name: str) -> dict[str, Any]:
    """The HF config.json of built-in base `name`."""
    dims = BUILTIN_BASES[name]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB_SIZE,
        **dims,
        "head_dim": dims["hidden_size"] // dims["num_attention_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": MAX_POSITIONS,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "bos_token_id": BOS,
        "eos_token_id": IM_END,
        "pad_token_id": PAD,
        "torch_dtype": "float32",
        "adapterdock_builtin": f"{name}-v{BUILTIN_VERSION}",
    }


def _weights(config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Deterministic N(0, 0.02) weights in HF Llama names; each tensor seeded by its name."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config["head_dim"]
    kv = config["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (config["num_attention_heads"] * head_dim, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, config["num_attention_heads"] * head_dim),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    tensors = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            tensors[name] = np.ones(shape, dtype=np.float32)
            continue
        seed = int.from_bytes(hashlib.sha256(f"{SEED}:{name}".encode()).digest()[:8], "little")
        rng = np.random.default_rng(seed)
        tensors[name] = rng.normal(0.0, 0.02, size=shape).astype(np.float32)
    return tensors


def train_tokenizer() -> Any:
    """Train the built-ins' byte-level BPE on the shipped corpus (single-threaded, so deterministic)."""
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    corpus = (Path(__file__).parent / "builtin" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    return tokenizer


def _tokenizer_files(out: Path) -> None:
    train_tokenizer().save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "pad_token": "<pad>",
        "model_max_length": MAX_POSITIONS,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out / "tokenizer_config.json", config)
    _write_json(
        out / "special_tokens_map.json",
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>"},
    )


def create_builtin_base(name: str, out_dir: str | Path) -> Path:
    """Write built-in base `name` (config, safetensors weights, tokenizer, chat template) into `out_dir`.

    Raises:
        BaseNotFoundError: if `name` is not a built-in.
    """
    if name not in BUILTIN_BASES:
        raise BaseNotFoundError(f"{name!r} is not a built-in base; built-ins: {', '.join(BUILTIN_BASES)}.")
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = llama_config(name)
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": BOS, "eos_token_id": IM_END, "pad_token_id": PAD, "do_sample": False},
    )
    save_file(_weights(config), str(out / "model.safetensors"), metadata={"format": "pt"})
    _tokenizer_files(out)
    logger.info("built base %s in %s", name, out)
    return out


def _builtin_path(name: str) -> Path:
    """The cached folder of built-in `name`, building it once (atomically) if absent."""
    target = bases_cache_dir() / f"{name}-v{BUILTIN_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{name}.{uuid.uuid4().hex}.tmp"
    try:
        create_builtin_base(name, staging)
        os.rename(staging, target)
    except OSError:
        if not (target / "model.safetensors").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ---- resolution and fingerprint ----------------------------------------------------------------
def resolve_base(name_or_path: str, registry: str | Path | None = None) -> BaseInfo:
    """Find base `name_or_path` and fingerprint it.

    Args:
        name_or_path: built-in name, local folder, `registry:NAME[@V]`, or HF model id.
        registry: the registry root for `registry:` names (default: the default registry).

    Raises:
        BaseNotFoundError: if it cannot be found; the message lists the accepted forms.
    """
    if name_or_path in BUILTIN_BASES:
        path = _builtin_path(name_or_path)
    elif name_or_path.startswith("registry:"):
        path = _registry_model_path(name_or_path.removeprefix("registry:"), registry)
    elif Path(name_or_path).expanduser().is_dir():
        path = Path(name_or_path).expanduser().resolve()
        if not (path / "config.json").is_file():
            raise BaseNotFoundError(f"{path} has no config.json; it is not an HF-format model folder.")
    else:
        path = _hf_snapshot(name_or_path)
    return BaseInfo(name_or_path=name_or_path, path=path, fingerprint=base_fingerprint(path))


def _registry_model_path(ref: str, registry: str | Path | None) -> Path:
    from hub.store import LocalStore

    stored = LocalStore(registry).get(ref)
    if stored.manifest.kind != "model":
        raise BaseNotFoundError(
            f"registry:{ref} is an adapter ({stored.manifest.method}), not a full model.",
            "Serve the base it was trained on and request the adapter by name instead.",
        )
    return stored.path


def _hf_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure here means "not in the local cache"
        pass
    try:
        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
        )
    except Exception as exc:  # noqa: BLE001 - network, auth, unknown repo: all one answer to the user
        raise BaseNotFoundError(
            f"Base {repo_id!r} is not built in, not a folder, and not downloadable: {exc}."
        ) from exc


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, read without loading tensors.

    Raises:
        CorruptAdapterError: if the header is truncated, absurdly large or not JSON.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise CorruptAdapterError(f"{path} is too short to be a safetensors file.")
        (length,) = struct.unpack("<Q", raw)
        if length > min(size - 8, 100 << 20):
            raise CorruptAdapterError(
                f"{path}: safetensors header claims {length} bytes; the file has {size}."
            )
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptAdapterError(f"{path}: safetensors header is not valid JSON ({exc}).") from exc
    if not isinstance(header, dict):
        raise CorruptAdapterError(f"{path}: safetensors header is not a JSON object.")
    return header


def base_fingerprint(path: str | Path) -> str:
    """A stable `sha256:<hex>` of a base's config and weights; sampled for models over 256 MiB."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise BaseNotFoundError(f"{path} has no *.safetensors weights (adapterdock never loads pickles).")
    stats = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    config = path / "config.json"
    config_stat = (config.stat().st_size, config.stat().st_mtime_ns) if config.is_file() else (0, 0)
    return _fingerprint(str(path), stats, config_stat)


@functools.lru_cache(maxsize=64)
def _fingerprint(
    path_text: str, stats: tuple[tuple[str, int, int], ...], config_stat: tuple[int, int]
) -> str:
    del config_stat  # part of the cache key only: a changed config.json must be re-read
    path = Path(path_text)
    digest = hashlib.sha256()
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"):
        config.pop(volatile, None)
    digest.update(json.dumps(config, sort_keys=True).encode())
    full = sum(size for _, size, _ in stats) <= _FULL_HASH_LIMIT
    for name, size, _ in stats:
        file = path / name
        header = read_safetensors_header(file)
        header.pop("__metadata__", None)
        digest.update(name.encode() + json.dumps(header, sort_keys=True).encode())
        with open(file, "rb") as handle:
            if full:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
                continue
            for i in range(_SAMPLE_CHUNKS + 1):
                handle.seek(max(0, (size - _CHUNK) * i // _SAMPLE_CHUNKS))
                digest.update(handle.read(_CHUNK))
    return "sha256:" + digest.hexdigest()


def describe_base(info: BaseInfo) -> dict[str, Any]:
    """Path, parameter count, dtypes and fingerprint of a base, from its headers (no tensors loaded)."""
    params, dtypes = 0, set()
    for file in sorted(info.path.glob("*.safetensors")):
        for key, meta in read_safetensors_header(file).items():
            if key == "__metadata__":
                continue
            params += int(np.prod(meta["shape"])) if meta["shape"] else 1
            dtypes.add(meta["dtype"])
    config = json.loads((info.path / "config.json").read_text())
    return {
        "name": info.name_or_path,
        "path": str(info.path),
        "architecture": (config.get("architectures") or [config.get("model_type", "?")])[0],
        "parameters": params,
        "dtype": ", ".join(sorted(dtypes)),
        "fingerprint": info.fingerprint,
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

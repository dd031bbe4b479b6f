"""Registered adapters as extra PEFT adapters on the one base in memory (DPO and PPO).

- `registered_adapter`: look up a registry reference (`--from`, `--reward`), check its task, its
  format (a PEFT LoRA/QLoRA adapter) and that it was trained on this very base (fingerprint).
- `load_policy_and_reference`: the `--from` SFT adapter loaded twice onto the same base, as
  "default" (trainable: it becomes the new adapter) and "reference" (frozen). One base, two small
  adapters; no second copy of the model.
- `attach_reward_adapter`: a reward adapter (SEQ_CLS LoRA with a `score` head) added to a causal
  LM as a frozen LoRA adapter named "reward", its head returned as a small separate `nn.Linear`;
  `reward_scores` runs the backbone with it and reads the head at each row's last non-pad token.
- `use_adapter`: a context manager that switches the active adapter and restores which
  parameters train afterwards (PEFT's `set_adapter` changes `requires_grad`).

Boundary: PEFT and the registry; no training loop and no losses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training, set_peft_model_state_dict
from safetensors.torch import load_file

from hub.adapter_format import check_base
from hub.bases import BaseInfo
from hub.store import LocalStore, StoredAdapter
from trainers.configs import ConfigError

logger = logging.getLogger(__name__)

POLICY = "default"  # PEFT saves the adapter named "default" at the folder's root
REFERENCE = "reference"
REWARD = "reward"
HEAD_KEY_SUFFIX = "score.weight"


def registered_adapter(
    ref: str, registry: str | None, base: BaseInfo, tasks: Sequence[str], option: str
) -> StoredAdapter:
    """Resolve `ref` in the registry (checksums verified) and check it suits this run.

    Raises:
        AdapterNotFoundError: no such adapter.
        ConfigError: wrong task, or not a PEFT LoRA adapter.
        BaseMismatchError: trained on another base.
    """
    stored = LocalStore(registry).get(ref)
    manifest = stored.manifest
    if manifest.task not in tasks:
        raise ConfigError(
            f"{option} {manifest.ref} is a {manifest.task!r} adapter; expected {' or '.join(tasks)}.",
            f"Pass a {tasks[0]} adapter (see `adapterdock hub list --task {tasks[0]}`).",
        )
    if manifest.kind != "adapter" or manifest.adapter_format != "peft":
        raise ConfigError(
            f"{option} {manifest.ref} is a {manifest.method} {manifest.kind} "
            f"({manifest.adapter_format}); it must be a LoRA/QLoRA adapter to share the base.",
            "Train it with --method lora or --method qlora.",
        )
    check_base(f"{option} {manifest.ref}", manifest.base, base.spec, expected_as="this run's base ")
    return stored


def load_policy_and_reference(
    model: torch.nn.Module, folder: str | Path, quantized: bool = False
) -> PeftModel:
    """Load the SFT adapter twice: "default" trainable (the policy), "reference" frozen.

    A 4-bit base (`quantized`) first gets PEFT's k-bit training preparation, as QLoRA does.
    """
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=POLICY, is_trainable=True)
    peft_model.load_adapter(str(folder), adapter_name=REFERENCE, is_trainable=False)
    peft_model.set_adapter(POLICY)
    _freeze_adapter(peft_model, REFERENCE)
    return peft_model


def attach_reward_adapter(model: PeftModel, folder: str | Path) -> torch.nn.Linear:
    """Add a registered reward adapter's LoRA as the frozen adapter "reward"; return its head.

    The reward LoRA was trained on the sequence-classification form of the same base, whose
    backbone (`model.layers...`) is the causal LM's, so its weights load unchanged; the `score`
    head (hidden -> 1) does not exist on a causal LM and becomes a separate linear layer.
    """
    folder = Path(folder)
    config = LoraConfig.from_pretrained(str(folder))
    config.modules_to_save = None
    config.task_type = "CAUSAL_LM"
    config.inference_mode = True
    state = load_file(folder / "adapter_model.safetensors")
    head_keys = [key for key in state if key.endswith(HEAD_KEY_SUFFIX)]
    if len(head_keys) != 1:
        raise ConfigError(
            f"{folder} holds {len(head_keys)} `score` head tensors; expected 1 (a reward adapter).",
            "Pass an adapter registered by `adapterdock train reward`.",
        )
    head_weight = state.pop(head_keys[0])
    model.add_adapter(REWARD, config)
    result = set_peft_model_state_dict(model, state, adapter_name=REWARD)
    missing = [k for k in result.missing_keys if f".{REWARD}." in k and "lora_" in k]
    if missing:
        raise ConfigError(f"{folder}: reward adapter weights missing for {missing[:3]}.")
    _freeze_adapter(model, REWARD)
    head = torch.nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=False)
    head.weight.data.copy_(head_weight.float())
    head.requires_grad_(False)
    return head.to(next(model.parameters()).device)


@contextmanager
def use_adapter(model: PeftModel, name: str | None) -> Iterator[None]:
    """Run the block with adapter `name` active (None: the bare base); then restore the previous
    adapter and every parameter's `requires_grad`. Use under `torch.no_grad()`."""
    flags = {param: param.requires_grad for param in model.parameters()}
    previous = model.active_adapter
    try:
        if name is None:
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(name, inference_mode=True)
            yield
    finally:
        if name is not None:
            model.set_adapter(previous)
        for param, flag in flags.items():
            param.requires_grad_(flag)


def reward_scores(
    model: PeftModel, head: torch.nn.Linear, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Scores of the reward adapter: head(hidden state at each row's last attended non-pad token).

    Rows may be left- or right-padded; positions follow the attention mask, as in generation. The
    score is read where the reward model was trained to give it and where the server reads it:
    `AutoModelForSequenceClassification` pools the last token that is not `pad_token_id`, so on a
    base whose pad token is its end-of-turn token (SmolLM2) that is the token before `<|im_end|>`.
    """
    base = model.get_base_model()
    with use_adapter(model, REWARD):
        hidden = base.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions(attention_mask),
        ).last_hidden_state
    pad_id = base.config.pad_token_id
    scored = attention_mask if pad_id is None else attention_mask * (input_ids != pad_id)
    last = last_token_index(scored)
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return head(picked.to(head.weight.dtype)).squeeze(-1).float()


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip padding (left or right): cumsum(mask) - 1, clamped at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last attended position."""
    width = attention_mask.shape[-1]
    idx = torch.arange(width, device=attention_mask.device).expand_as(attention_mask)
    return (idx * attention_mask.long()).argmax(-1)


def _freeze_adapter(model: torch.nn.Module, name: str) -> None:
    for param_name, param in model.named_parameters():
        if f".{name}." in param_name:
            param.requires_grad_(False)

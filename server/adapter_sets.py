"""A weighted adapter set as one LoRA: the parts' factors concatenated along the rank.

For parts with LoRA factors (A_i, B_i), scalings s_i and weights w_i, the set's delta on a row is
sum_i w_i * s_i * B_i A_i x. Stacking the A_i (rank r_1 + ... + r_n) and the w_i * s_i * B_i side by side
gives exactly that delta as ONE LoRA of scaling 1, which then occupies one engine slot and is applied per
row like any other adapter (no extra work for the batch). This is PEFT's
`add_weighted_adapter(..., combination_type="cat")`; its `"linear"` mixes the A and B factors and adds
cross terms, so it is not used. A module that some parts do not adapt takes only the others' factors.

Only plain LoRA parts combine: a DoRA part rescales its layer's whole output (not a delta that sums), a
bottleneck is not low-rank, and a task head cannot be summed. Boundary: manifests (`check_combinable`,
torch-free, used on the request path) and tensors (`combine_lora`, which imports torch when called, in the
engine); which parts a request names and resolving them is `server.leases`'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hub.manifest import GENERATION_TASKS, Manifest
from server.errors import AdapterSetTooLargeError, NotCombinableError

if TYPE_CHECKING:
    from server.adapter_weights import AdapterWeights

COMBINABLE_METHODS = ("lora", "qlora")
"""Manifest methods whose adapters combine (their deltas add up)."""


def check_combinable(name: str, manifest: Manifest) -> None:
    """Refuse, from its manifest, a set part that is not a generation LoRA (before anything loads).

    Raises:
        NotCombinableError: naming the part and what it is.
    """
    if manifest.method not in COMBINABLE_METHODS or manifest.adapter_format != "peft":
        raise NotCombinableError(
            f"{name} is a {manifest.method} adapter; only LoRA / QLoRA adapters combine in a weighted set "
            "(their deltas add up; DoRA rescales a layer's whole output, a bottleneck is not low-rank)."
        )
    if manifest.task not in GENERATION_TASKS:
        raise NotCombinableError(
            f"{name} is a {manifest.task} adapter; only generation adapters ({', '.join(GENERATION_TASKS)}) "
            "combine in a weighted set."
        )


def combine_lora(key: str, parts: list[tuple[str, AdapterWeights, float]], max_rank: int) -> AdapterWeights:
    """One LoRA whose delta is the weighted sum of the parts' deltas (rank: the sum of theirs, per module).

    Args:
        key: the set's canonical key (for messages).
        parts: (part's `name@version`, its weights, its weight in the set).
        max_rank: the largest rank an engine slot holds (`--max-rank`).

    Raises:
        NotCombinableError: a part is a DoRA, bottleneck or task-head adapter.
        AdapterSetTooLargeError: some module's summed rank is above `max_rank`.
    """
    import torch

    from server.adapter_weights import AdapterWeights, LoraModule

    for name, weights, _ in parts:
        _check_combinable(key, name, weights)
    modules = sorted({module for _, weights, _ in parts for module in weights.lora})
    combined = AdapterWeights(method="lora")
    for module in modules:
        members = [(w.lora[module], weight) for _, w, weight in parts if module in w.lora]
        rank = sum(m.a.shape[0] for m, _ in members)
        if rank > max_rank:
            ranks = " + ".join(str(m.a.shape[0]) for m, _ in members)
            raise AdapterSetTooLargeError(
                f"The adapter set {key} needs LoRA rank {ranks} = {rank} in {module}, above the server's "
                f"--max-rank {max_rank} (a set's ranks add up).",
                f"Restart the server with --max-rank {rank} or more, or combine fewer or smaller adapters.",
            )
        a = torch.cat([m.a.float() for m, _ in members], dim=0)
        b = torch.cat([m.b.float() * (weight * m.scale) for m, weight in members], dim=1)
        combined.lora[module] = LoraModule(a=a, b=b, scale=1.0)
        combined.rank = max(combined.rank, rank)
    return combined


def _check_combinable(key: str, name: str, weights: AdapterWeights) -> None:
    if weights.method != "lora" or any(m.magnitude is not None for m in weights.lora.values()):
        kind = "a DoRA" if weights.method == "dora" else f"a {weights.method}"
        raise NotCombinableError(
            f"{name} in the adapter set {key} is {kind} adapter; only plain LoRA adapters combine "
            "(their deltas add up; DoRA rescales a layer's whole output, a bottleneck is not low-rank)."
        )
    if weights.head_weight is not None:
        raise NotCombinableError(
            f"{name} in the adapter set {key} carries a task head, which cannot be summed."
        )

"""`hub import`'s fit check and the base fingerprint on every architecture the server declares.

PEFT adapters of each tiny family (`tests/server/arch_bases.py`), fused Phi-3 `qkv_proj` / `gate_up_proj`
included, fit their own base and are refused by another family's; a sharded checkpoint
(`model-0000x-of-0000y.safetensors` + index) is fingerprinted over all its shards and checked like one file.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.bases import BaseInfo, base_fingerprint, resolve_base
from hub.compat import check_peft_fits_base
from hub.errors import BaseMismatchError
from tests.server.arch_bases import FAMILIES, LORA_TARGETS, build_arch_base
from tests.server.conftest import make_peft_adapter


@pytest.fixture(scope="module")
def arch_bases(tiny_base: BaseInfo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, BaseInfo]:
    root = tmp_path_factory.mktemp("compat-arch")
    return {f: resolve_base(str(build_arch_base(f, root / f, tiny_base.path))) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_fits_its_own_architecture(family: str, arch_bases, tmp_path: Path) -> None:
    base = arch_bases[family]
    folder = make_peft_adapter(base, tmp_path / "a", r=4, targets=LORA_TARGETS[family])
    assert check_peft_fits_base(folder, base.path)["r"] == 4


def test_fused_phi3_adapter_is_refused_by_a_llama_base_and_back(arch_bases, tmp_path: Path) -> None:
    phi3 = make_peft_adapter(arch_bases["phi3"], tmp_path / "phi3", r=4, targets=LORA_TARGETS["phi3"])
    with pytest.raises(BaseMismatchError, match="qkv_proj"):
        check_peft_fits_base(phi3, arch_bases["llama"].path)
    llama = make_peft_adapter(arch_bases["llama"], tmp_path / "llama", r=4, targets=LORA_TARGETS["llama"])
    with pytest.raises(BaseMismatchError, match="has no layer"):
        check_peft_fits_base(llama, arch_bases["phi3"].path)


def test_sharded_checkpoint_is_fingerprinted_and_checked(tiny_base: BaseInfo, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(tiny_base.path)
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="2MB")
    shards = sorted(p.name for p in sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (sharded / "model.safetensors.index.json").is_file()
    first = base_fingerprint(sharded)
    assert first.startswith("sha256:") and base_fingerprint(sharded) == first
    folder = make_peft_adapter(tiny_base, tmp_path / "a", r=4)
    check_peft_fits_base(folder, sharded)  # the layers of every shard are found
    last = sharded / shards[-1]
    data = bytearray(last.read_bytes())
    data[-1] ^= 0xFF  # one weight byte of the last shard changes
    last.write_bytes(bytes(data))
    assert base_fingerprint(sharded) != first

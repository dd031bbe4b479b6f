"""Request types: one GenerationRequest builder for every route, torch-free, errors mapped by class."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

from server.errors import QueueFullError, SequenceTooLongError, spec_for
from server.requests import GenerationRequest, Sampling, generation_requests
from server.schemas import CompletionRequest, GenerateParameters


def test_n_samples_per_prompt_with_consecutive_seeds_and_bounded_min_tokens():
    adapter = SimpleNamespace(key="chat@1", slot=1)
    sampling = Sampling(temperature=0.7, top_p=0.9, seed=5, stop=("\n",), ignore_eos=True, min_tokens=50)
    built = generation_requests([[1, 2], [3]], adapter, max_new_tokens=8, sampling=sampling, n=2)
    # sample j of every prompt is seeded seed + j (as OpenAI's n samples of one prompt differ)
    assert [(r.prompt_ids, r.seed) for r in built] == [([1, 2], 5), ([1, 2], 6), ([3], 5), ([3], 6)]
    assert built[0] == GenerationRequest(
        prompt_ids=[1, 2], adapter=adapter, max_new_tokens=8, temperature=0.7, top_p=0.9, seed=5,
        stop=["\n"], ignore_eos=True, min_tokens=8,
    )  # fmt: skip
    built[0].stop.append("x")
    assert built[1].stop == ["\n"]  # each request owns its stop list
    unseeded = generation_requests([[1]], None, max_new_tokens=4, sampling=Sampling(), n=3)
    assert [r.seed for r in unseeded] == [None] * 3 and unseeded[0].adapter is None


def test_wire_formats_give_their_sampling_settings():
    body = CompletionRequest(model="m", prompt="p", temperature=0.5, seed=3, stop="END", min_tokens=2)
    assert body.sampling_settings() == Sampling(0.5, 1.0, 3, ("END",), False, 2)
    tgi = GenerateParameters(top_p=0.8, stop=["a"], ignore_eos_token=True, min_new_tokens=1, seed=9)
    assert tgi.sampling_settings() == Sampling(1.0, 0.8, 9, ("a",), True, 1)
    assert GenerateParameters().sampling_settings().temperature == 0.0  # TGI: greedy unless asked


def test_engine_and_scheduler_errors_map_by_class():
    class Subclass(SequenceTooLongError):
        pass

    assert (spec_for(QueueFullError("full")).status, spec_for(QueueFullError("full")).code) == (
        503,
        "queue_full",
    )
    assert spec_for(Subclass("long")).code == "input_too_long"


def test_the_http_layer_imports_no_torch():
    code = (
        "import sys, server.app, server.requests, server.routes.openai, server.routes.tasks; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

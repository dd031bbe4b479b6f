"""Request bodies: bounds, NaN refusal, neutral-only unsupported fields, TGI sampling, config checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.config import ServerConfig
from server.errors import ServerConfigError, UnsupportedParameterError
from server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateParameters,
    GenerateRequest,
    ScoreRequest,
    TextsRequest,
)


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": float("nan")},
        {"max_tokens": 0},
        {"n": 0},
        {"n": 100},
        {"seed": -1},
        {"min_tokens": -1},
        {"stop": [""]},
        {"stop": ["x"] * 17},
        {"prompt": []},
        {"prompt": [[1], []]},
        {"model": ""},
    ],
)
def test_completion_bounds(fields: dict):
    body = {"model": "chat", "prompt": "hi", **fields}
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(body)


def test_completion_defaults_and_prompt_forms():
    body = CompletionRequest.model_validate({"model": "chat", "prompt": "hi", "stop": "\n", "future": 1})
    assert (body.temperature, body.top_p, body.n, body.max_tokens, body.stop) == (1.0, 1.0, 1, None, ["\n"])
    assert body.prompts() == ["hi"]
    assert CompletionRequest(model="m", prompt=[5, 6]).prompts() == [[5, 6]]
    assert CompletionRequest(model="m", prompt=[[5], [6, 7]]).prompts() == [[5], [6, 7]]
    assert CompletionRequest(model="m", prompt=["a", "b"]).prompts() == ["a", "b"]


@pytest.mark.parametrize(
    "fields",
    [
        {"presence_penalty": 0.5},
        {"frequency_penalty": 1.0},
        {"logprobs": 3},
        {"best_of": 2},
        {"top_k": 5},
        {"logit_bias": {"5": 1.0}},
        {"suffix": "x"},
    ],
)
def test_unimplemented_fields_are_refused_unless_neutral(fields: dict):
    body = CompletionRequest.model_validate({"model": "chat", "prompt": "hi", **fields})
    with pytest.raises(UnsupportedParameterError, match=next(iter(fields))):
        body.check_supported()


def test_neutral_values_pass():
    body = CompletionRequest.model_validate(
        {"model": "m", "prompt": "p", "presence_penalty": 0, "top_k": -1, "logprobs": None, "best_of": 1}
    )
    body.check_supported()


def test_chat_messages_and_limits():
    body = ChatCompletionRequest.model_validate(
        {
            "model": "chat",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            "max_completion_tokens": 7,
            "max_tokens": 3,
        }
    )
    assert body.messages[1].text() == "ab"
    assert body.requested_max_tokens == 7
    body.check_supported()
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": []})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "tool", "content": "x"}]})
    tools = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}
    )
    with pytest.raises(UnsupportedParameterError, match="tools"):
        tools.check_supported()


def test_tgi_sampling_rule():
    assert GenerateParameters().sampling == (0.0, 1.0)  # greedy unless asked
    assert GenerateParameters(do_sample=True).sampling == (1.0, 1.0)
    assert GenerateParameters(temperature=0.7).sampling == (0.7, 1.0)
    assert GenerateParameters(top_p=0.9).sampling == (1.0, 0.9)


def test_tgi_request_shape_from_clients():
    # what lorax-client sends (merged_adapters, api_token and friends are null)
    body = GenerateRequest.model_validate(
        {
            "inputs": "hi",
            "parameters": {
                "adapter_id": "chat@1",
                "adapter_source": "local",
                "merged_adapters": None,
                "api_token": None,
                "do_sample": False,
                "max_new_tokens": 5,
                "details": True,
                "stop": [],
                "watermark": False,
                "return_k_alternatives": None,
            },
            "stream": False,
        }
    )
    body.parameters.check_supported()
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate({"inputs": "hi", "parameters": {"adapter_source": "s3"}})
    with pytest.raises(ValidationError):
        GenerateRequest.model_validate({"inputs": ""})
    with pytest.raises(UnsupportedParameterError, match="watermark"):
        GenerateParameters(watermark=True).check_supported()


def test_task_bodies():
    assert TextsRequest(adapter="a", inputs="one").texts() == ["one"]
    with pytest.raises(ValidationError):
        TextsRequest(adapter="a", inputs=[])
    pairs = ScoreRequest.model_validate(
        {"adapter": "r", "inputs": [{"prompt": "p", "response": "r"}, ["p2", "r2"]]}
    ).pairs()
    assert pairs == [("p", "r"), ("p2", "r2")]
    single = ScoreRequest.model_validate({"adapter": "r", "inputs": {"prompt": "p", "response": "r"}})
    assert single.pairs() == [("p", "r")]


def test_config_validation_reports_every_problem():
    with pytest.raises(ServerConfigError) as err:
        ServerConfig(quantize="fp8", max_adapters=0, port=70000, max_adapter_memory_mb=-1).validate()
    message = str(err.value)
    for fragment in ("quantize='fp8'", "max_adapters=0", "port=70000", "max_adapter_memory_mb=-1"):
        assert fragment in message
    assert ServerConfig(max_adapter_memory_mb=1.5).max_adapter_bytes == 1572864

"""Request bodies of every endpoint, as pydantic models with their bounds.

Boundary: shape and static bounds only (types, ranges, no NaN or infinity). Limits that depend on how the
server was started (--max-new-tokens, --max-input-tokens) are checked by the routes, so they answer 400, not
422. Unknown fields are ignored, as OpenAI-compatible servers do; known fields this server does not
implement are accepted only at their neutral value, never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.errors import UnsupportedParameterError
from server.requests import Sampling

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256
MAX_CHOICES = 8
MAX_SEED = 2**63 - 1

Temperature = Annotated[float, Field(ge=0.0, le=100.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
AdapterSource = Literal["local", "hub"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)


def _stop_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else list(value)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
    for stop in stops:
        if not stop or len(stop) > MAX_STOP_LENGTH:
            raise ValueError(f"stop sequences must have 1 to {MAX_STOP_LENGTH} characters")
    return stops


def _require_neutral(body: BaseModel, neutral: dict[str, tuple[Any, ...]]) -> None:
    """Refuse fields this server does not implement unless they hold a value that changes nothing."""
    for name, allowed in neutral.items():
        value = getattr(body, name)
        if value not in allowed:
            raise UnsupportedParameterError(f"Parameter {name}={value!r} is not supported by this server.")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingBody(_Body):
    """Fields OpenAI's completions and chat completions share."""

    model: str = Field(min_length=1, max_length=256)
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: list[str] | str | None = None
    seed: Seed | None = None
    ignore_eos: bool = False
    """vLLM's extra: keep generating past the end-of-sequence token."""
    min_tokens: int = Field(default=0, ge=0)
    """vLLM's extra: generate at least this many tokens before stopping."""
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    top_k: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        return _stop_list(value)

    def check_supported(self) -> None:
        """Raise `UnsupportedParameterError` for non-neutral values of unimplemented fields."""
        _require_neutral(
            self,
            {
                "presence_penalty": (None, 0.0),
                "frequency_penalty": (None, 0.0),
                "repetition_penalty": (None, 1.0),
                "top_k": (None, 0, -1),
                "logit_bias": (None, {}),
            },
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_settings(self) -> Sampling:
        """The sampling fields, for `server.requests.generation_requests`."""
        return Sampling(
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop or ()),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
        )


class CompletionRequest(SamplingBody):
    """`POST /v1/completions`: `model` is an adapter reference or the base's name."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=None, ge=1)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt list is empty")
        if isinstance(value, list) and isinstance(value[0], list) and any(not p for p in value):
            raise ValueError("a token-id prompt is empty")
        return value

    def check_supported(self) -> None:
        super().check_supported()
        _require_neutral(self, {"logprobs": (None, 0), "best_of": (None, 1), "suffix": (None, "")})

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list of texts or token-id lists."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingBody):
    """`POST /v1/chat/completions`: `model` is an adapter reference or the base's name."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        _require_neutral(
            self,
            {
                "logprobs": (None, False),
                "top_logprobs": (None, 0),
                "tools": (None, []),
                "tool_choice": (None, "none", "auto"),
            },
        )
        if self.response_format not in (None, {"type": "text"}):
            raise UnsupportedParameterError("Only response_format {'type': 'text'} is supported.")

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class GenerateParameters(_Body):
    """The `parameters` of TGI's / LoRAX's `/generate` (what `lorax-client` and `text-generation` send)."""

    adapter_id: str | None = Field(default=None, max_length=256)
    adapter_source: str | None = None
    api_token: str | None = Field(default=None, repr=False)
    merged_adapters: dict[str, Any] | None = None
    do_sample: bool = False
    max_new_tokens: int | None = Field(default=None, ge=1)
    ignore_eos_token: bool = False
    min_new_tokens: int = Field(default=0, ge=0)
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    return_full_text: bool = False
    stop: list[str] = Field(default_factory=list)
    seed: Seed | None = None
    temperature: Temperature | None = None
    top_k: int | None = None
    top_p: TopP | None = None
    truncate: int | None = Field(default=None, ge=1)
    typical_p: float | None = None
    best_of: int | None = None
    watermark: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_k_alternatives: int | None = None
    top_n_tokens: int | None = None
    grammar: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: list[str]) -> list[str]:
        return _stop_list(value)

    @field_validator("adapter_source")
    @classmethod
    def _check_source(cls, value: str | None) -> str | None:
        if value not in (None, "local", "hub"):
            raise ValueError("adapter_source must be 'local' or 'hub'")
        return value

    def check_supported(self) -> None:
        _require_neutral(
            self,
            {
                "merged_adapters": (None,),
                "repetition_penalty": (None, 1.0),
                "frequency_penalty": (None, 0.0),
                "top_k": (None, 0),
                "typical_p": (None, 1.0),
                "best_of": (None, 1),
                "watermark": (False,),
                "decoder_input_details": (False,),
                "return_k_alternatives": (None, 0),
                "top_n_tokens": (None, 0),
                "grammar": (None,),
                "response_format": (None,),
            },
        )

    @property
    def sampling(self) -> tuple[float, float]:
        """(temperature, top_p) with TGI's rule: greedy unless do_sample or a sampling knob is set."""
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        sample = self.do_sample or temperature != 1.0 or top_p < 1.0
        return (temperature if sample else 0.0), top_p

    def sampling_settings(self) -> Sampling:
        """The sampling fields under TGI's names and rule, for `server.requests.generation_requests`."""
        temperature, top_p = self.sampling
        return Sampling(
            temperature=temperature,
            top_p=top_p,
            seed=self.seed,
            stop=tuple(self.stop),
            ignore_eos=self.ignore_eos_token,
            min_tokens=self.min_new_tokens,
        )


class GenerateRequest(_Body):
    """`POST /generate`, `/generate_stream` and TGI's `POST /` (which streams when `stream` is true)."""

    inputs: str = Field(min_length=1)
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = False


class ScorePair(_Body):
    prompt: str
    response: str


class _TaskBody(_Body):
    adapter: str = Field(min_length=1, max_length=256)
    adapter_source: AdapterSource | None = None


class TextsRequest(_TaskBody):
    """`POST /v1/classify` and `POST /v1/ner`: one text or a list of texts."""

    inputs: str | list[str]

    def texts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)

    @field_validator("inputs")
    @classmethod
    def _check_inputs(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("inputs is empty")
        return value


class ScoreRequest(_TaskBody):
    """`POST /v1/score`: prompt/response pairs for a reward adapter."""

    inputs: ScorePair | list[ScorePair | tuple[str, str]]

    @model_validator(mode="after")
    def _check_inputs(self) -> ScoreRequest:
        if isinstance(self.inputs, list) and not self.inputs:
            raise ValueError("inputs is empty")
        return self

    def pairs(self) -> list[tuple[str, str]]:
        items = [self.inputs] if isinstance(self.inputs, ScorePair) else self.inputs
        return [(p.prompt, p.response) if isinstance(p, ScorePair) else (p[0], p[1]) for p in items]


class LoadAdapterRequest(_Body):
    """`POST /v1/adapters/load`."""

    adapter: str = Field(min_length=1, max_length=256)
    adapter_source: AdapterSource | None = None
    pin: bool = False

"""OpenAI-compatible request models (the subset we serve) and how they map to sampling params.

Unknown top-level fields are ignored like OpenAI's server does; everything we read is typed and
range-checked, and anything we cannot honour (e.g. penalties) is a 400 naming the field. Types are
strict, as JSON Schema reads them: `0` is not `false`, `[true]` is not a list of token ids.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from maverick_serve.engine.types import SamplingParams


def _json_integer(value: object) -> object:
    """JSON Schema's integer: 10.0 is one (some clients compute their counts as floats), true is not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    url: str = Field(description="A data: URL (base64 image), or http(s) when remote images are enabled.")
    detail: str | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False, description="0 is greedy; default 1.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus mass; default 1.")
    top_k: int | None = Field(
        None, ge=-1, description="Extension: keep the k most likely tokens (0, -1: off)."
    )
    n: int = Field(1, ge=1, description="Choices to generate.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, description="Extension: token ids that end generation."
    )
    seed: int | None = Field(None, ge=0, lt=2**63, description="Seed of the sampler (0 ≤ seed < 2**63).")
    user: str | None = None
    presence_penalty: float = Field(0.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, allow_inf_nan=False)
    ignore_eos: bool = Field(False, description="Extension: generate past end-of-sequence tokens.")

    _integers = field_validator("n", "top_k", "seed", mode="before")(_json_integer)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="Deprecated by OpenAI for max_completion_tokens.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most.")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, description="Top logprobs per token (with logprobs).")

    _counts = field_validator("max_tokens", "max_completion_tokens", "top_logprobs", mode="before")(
        _json_integer
    )

    def sampling(self) -> SamplingParams:
        lp = (self.top_logprobs or 0) if self.logprobs else None
        return _sampling(self, self.max_completion_tokens or self.max_tokens, lp)


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1, description="Tokens to generate at most.")
    logprobs: int | None = Field(None, ge=0, description="Top logprobs per token.")
    echo: bool = False

    _counts = field_validator("max_tokens", "logprobs", mode="before")(_json_integer)

    def sampling(self) -> SamplingParams:
        return _sampling(self, self.max_tokens, self.logprobs)


def _sampling(req: _Common, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=req.seed,
        stop=req.stop_list(),
        stop_token_ids=req.stop_token_ids or [],
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
    )


class EngineWorkItem(BaseModel):
    """What the router sends an engine replica: plain data, no pickled objects.

    `prompt_token_ids` already hold each image's full token layout; `images` are the raw
    encoded bytes the replica tiles itself (smaller on the wire than pixel tensors).
    """

    model_config = ConfigDict(extra="forbid")

    request_id: str
    prompt_token_ids: list[int]
    images: list[bytes] = Field(default_factory=list)
    sampling: SamplingParams
    route: list[str] = Field(
        default_factory=list, description="Engine replica ids, best first (the router's ranking)."
    )

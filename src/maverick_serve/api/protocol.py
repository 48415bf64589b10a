"""OpenAI-compatible request models (the subset we serve) and how they map to sampling params.

Unknown top-level fields are ignored like OpenAI's server does; everything we read is typed and
range-checked, and anything we cannot honour (e.g. penalties) is a 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from maverick_serve.engine.types import SamplingParams


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str = Field(description="A data: URL (base64 image), or http(s) when remote images are enabled.")
    detail: str | None = None


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(None, description="0 is greedy; default 1.")
    top_p: float | None = None
    top_k: int | None = Field(None, description="Extension: keep the k most likely tokens.")
    n: int = Field(1, description="Choices to generate.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, description="Extension: token ids that end generation.")
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = Field(False, description="Extension: generate past end-of-sequence tokens.")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def sampling(self) -> SamplingParams:
        lp = (self.top_logprobs or 0) if self.logprobs else None
        return _sampling(self, self.max_completion_tokens or self.max_tokens, lp)


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False

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

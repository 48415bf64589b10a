"""Requests, sampling parameters, streamed outputs and stats exchanged with an engine.

All of these are plain data (pydantic / dataclasses) so they cross process boundaries as JSON.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length", "abort"]


class InvalidRequestError(ValueError):
    """A request the engine refuses before any compute; `field` names the offending input."""

    def __init__(self, field: str, message: str, limit: int | float | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.limit = limit


class EngineDeadError(RuntimeError):
    """The engine stopped (crash or shutdown); in-flight requests cannot finish."""


GREEDY_BELOW_TEMPERATURE = 1e-5


class SamplingParams(BaseModel):
    """How to pick tokens. Checked by `validate()` against the engine's limits, not on construction,
    so out-of-range values produce an `InvalidRequestError` that names the field."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(None, description="Tokens to generate; None fills the context.")
    temperature: float = Field(1.0, description="0 is greedy.")
    top_p: float = Field(1.0, description="Nucleus mass in (0, 1].")
    top_k: int = Field(0, description="Keep the k most likely tokens; 0 or -1 disables.")
    seed: int | None = Field(None, description="Seed of this request's sampler.")
    stop: list[str] = Field(default_factory=list, description="Strings that end generation (not returned).")
    stop_token_ids: list[int] = Field(
        default_factory=list, description="Extra token ids that end generation."
    )
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence tokens.")
    logprobs: int | None = Field(
        None, description="Return this many top logprobs per token (0 = only the chosen)."
    )
    skip_special_tokens: bool = Field(True, description="Drop special tokens from the text.")

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflow to inf and the softmax to NaN.
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def validate_against(self, max_logprobs: int, vocab_size: int) -> None:
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise InvalidRequestError("max_tokens", f"max_tokens must be ≥ 1, got {self.max_tokens}", 1)
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError("temperature", f"temperature must be ≥ 0, got {self.temperature}", 0)
        if not (0 < self.top_p <= 1):
            raise InvalidRequestError("top_p", f"top_p must be in (0, 1], got {self.top_p}", 1)
        if self.top_k < -1:
            raise InvalidRequestError("top_k", f"top_k must be -1, 0 (off) or ≥ 1, got {self.top_k}", -1)
        if self.logprobs is not None and not (0 <= self.logprobs <= max_logprobs):
            raise InvalidRequestError(
                "logprobs",
                f"logprobs must be between 0 and {max_logprobs}, got {self.logprobs}",
                max_logprobs,
            )
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(
                "stop_token_ids",
                f"stop_token_ids {bad} are outside the vocabulary (0..{vocab_size - 1})",
                vocab_size,
            )


@dataclass
class ImageInput:
    """A preprocessed image: its tiles and the content hash that keys caches."""

    pixel_values: torch.Tensor  # [tiles, 3, tile, tile]
    num_patch_tokens: int
    content_hash: str


@dataclass
class EngineRequest:
    """One generation request. `prompt_token_ids` already hold each image's full token layout
    (image_start … patches … image_end), so patch positions receive `images` in order."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    images: list[ImageInput] = field(default_factory=list)
    arrival_time: float = 0.0
    record_steps: bool = False  # keep each step's timing in RequestTiming.steps (opt-in traces)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestTiming:
    """Where one request's time went inside the engine: `time.monotonic()` stamps of this
    process, plus KV-tier work done for it on admission. Sent on the final output only."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    tier_lookup_s: float = 0.0  # EXISTS probe + MGET load of the tier prefix, on admission
    tier_hit_tokens: int = 0
    # (start, end, expert-dispatch seconds) of each step this request was in; only when the
    # request asked (`record_steps`), at most MAX_RECORDED_STEPS.
    steps: list[tuple[float, float, float]] = field(default_factory=list)


MAX_RECORDED_STEPS = 512


@dataclass
class RequestOutput:
    """A delta of one request: the tokens and text produced since the previous delta."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] | None = None
    timing: RequestTiming | None = None
    # On the last delta, KV tier keys that will hold the end of the prompt once its write-behind
    # stores land (vLLM backend: the tier connector names them; a prefill replica waits for them).
    tier_keys: list[str] | None = None


def merge_outputs(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One delta carrying both: `first`'s tokens then `later`'s, and `later`'s end state (finish,
    usage, timing, tier keys). Used to send deltas that piled up as one message."""
    logprobs = None
    if first.logprobs is not None or later.logprobs is not None:
        logprobs = [*(first.logprobs or []), *(later.logprobs or [])]
    return dataclasses.replace(
        later,
        new_token_ids=[*first.new_token_ids, *later.new_token_ids],
        text_delta=first.text_delta + later.text_delta,
        logprobs=logprobs,
    )


class EngineStats(BaseModel):
    """A snapshot for metrics, routing and autoscaling."""

    @property
    def kv_usage(self) -> float:
        """KV blocks held by requests / all blocks, over every layer group (0 without blocks)."""
        total = sum(self.kv_blocks_total.values())
        return sum(self.kv_blocks_used.values()) / total if total else 0.0

    running: int = Field(0, description="Requests scheduled in the current batch.")
    waiting: int = Field(0, description="Requests queued for admission.")
    kv_blocks_total: dict[str, int] = Field(default_factory=dict, description="Blocks per layer group.")
    kv_blocks_used: dict[str, int] = Field(default_factory=dict, description="Blocks held by requests.")
    kv_blocks_free: dict[str, int] = Field(
        default_factory=dict, description="Blocks free or cached-evictable."
    )
    prefix_cache_hit_tokens: int = Field(0, description="Prompt tokens served from the prefix cache, total.")
    prompt_tokens_total: int = Field(0, description="Prompt tokens admitted, total.")
    generated_tokens_total: int = Field(0, description="Tokens generated, total.")
    prefill_tokens_per_s: float = Field(0.0, description="Prompt tokens computed per second, recent window.")
    decode_tokens_per_s: float = Field(0.0, description="Tokens generated per second, recent window.")
    steps_total: int = Field(0, description="Engine steps run.")
    preemptions_total: int = Field(0, description="Requests preempted for lack of KV blocks.")
    expert_imbalance: float | None = Field(
        None, description="Max/mean expert-worker load over the window (disaggregated experts only)."
    )
    expert_tokens: dict[int, list[float]] = Field(
        default_factory=dict, description="MoE layer → tokens per routed expert over the window."
    )
    kvtier: dict[str, float] = Field(
        default_factory=dict,
        description="KV tier counters: hit/miss tokens, bytes in/out, load/store seconds, blocks stored, "
        "dropped stores, checksum failures, errors.",
    )
    expert_rebalances_total: int = Field(0, description="Placements switched by rebalancing.")
    expert_failovers_total: int = Field(0, description="Expert workers failed over.")
    expert_replacements_total: int = Field(
        0, description="Dead expert workers replaced, their experts moved back onto the replacement."
    )

"""Router settings: the routing policy, replica state, backpressure, retries and API keys."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PolicyName = Literal["round_robin", "least_load", "cache_aware", "multimodal_cache_aware"]


class ScorerWeights(BaseModel):
    """Weights of the scorers a policy sums; 0 switches a scorer off."""

    model_config = ConfigDict(extra="forbid")

    prefix: float = Field(0.0, ge=0, description="Share of the prompt already in the replica's prefix cache.")
    tier: float = Field(0.0, ge=0, description="Share of the prompt in a KV tier the replica can load from.")
    load: float = Field(0.0, ge=0, description="Low queued work (prefill tokens + requests) on the replica.")
    image: float = Field(
        0.0,
        ge=0,
        description="Low in-flight image work on the replica (only for requests with images).",
    )
    session: float = Field(
        0.0, ge=0, description="The replica that served this session (`user` field or header) before."
    )


class RoutingConfig(BaseModel):
    """How the router picks an engine replica for each request."""

    model_config = ConfigDict(extra="forbid")

    policy: PolicyName = Field(
        "multimodal_cache_aware",
        description="round_robin | least_load | cache_aware | multimodal_cache_aware.",
    )
    weights: ScorerWeights | None = Field(
        None, description="Override the named policy's scorer weights (round_robin ignores them)."
    )
    state_interval_s: float = Field(
        0.25,
        gt=0,
        le=5,
        description="Replicas publish load and cache events, routers poll, this often. Each is a Serve "
        "handle call that the one hub replica serves in turn, so the cost grows with replicas × "
        "1/interval; a router counts what it sent itself at once, so only other routers' requests "
        "and cache events wait up to two intervals.",
    )
    state_expiry_s: float = Field(
        3.0, gt=0, description="A replica silent for this long is no longer routed to."
    )
    admit_by_predicted_wait: bool = Field(
        True,
        description="Admit a request where the replica's predicted queue wait (queued prompt "
        "tokens and waiting requests over its measured rates) plus its own run fits the time left "
        "to its deadline (router.request_timeout_s); 429 only when no replica can. Off: the two "
        "memory bounds below alone.",
    )
    deadline_headroom: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Admit only where the predicted finish is within this share of the time left to "
        "the deadline (predictions are averages of the last seconds).",
    )
    max_queue_per_replica: int = Field(
        1024,
        ge=1,
        description="Memory bound: requests a replica may have waiting (sent, not yet running) "
        "whatever the predicted wait; when every replica is full → 429.",
    )
    max_queued_tokens_per_replica: int = Field(
        16_000_000,
        ge=1,
        description="Memory bound: prompt tokens queued on a replica (not yet computed); a request "
        "beyond it goes elsewhere or gets 429, except on a replica with nothing queued.",
    )
    retry_after_s: int = Field(
        1, ge=1, description="Retry-After of a 429 or 503 when no replica has measured its drain rate."
    )
    scale_up_wait_s: float = Field(
        30.0,
        ge=0,
        description="When every engine replica is full but more are starting (autoscaling), wait "
        "up to this long (within the request deadline) for one instead of answering 429.",
    )
    max_retries: int = Field(
        2, ge=0, description="Retries on another replica when one fails before the first token."
    )
    session_header: str = Field(
        "x-session-id", description="Header naming a session for stickiness (else the `user` field)."
    )
    tier_weight: float = Field(
        0.8, ge=0, le=1, description="A block loadable from the KV tier is worth this much of a local hit."
    )
    image_memory_s: float = Field(
        10.0, gt=0, description="Half-life of the image work a replica recently received (spreads bursts)."
    )
    index_capacity_blocks: int = Field(
        4_000_000, ge=1000, description="Cached-block entries the router tracks (oldest dropped first)."
    )

    def hub_expiry_s(self) -> float:
        """How long the replica-state hub keeps a silent replica: past the routers' own
        `state_expiry_s`, so their views drop it first."""
        return self.state_expiry_s * 3


class ApiKey(BaseModel):
    """One client key, stored as the SHA-256 of the key, never the key itself."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="Who holds the key (metrics, logs).")
    sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="Hex SHA-256 of the key (`maverick-serve hash-key`)."
    )
    requests_per_min: int | None = Field(None, ge=1, description="Request limit (None: auth.default).")
    tokens_per_min: int | None = Field(
        None, ge=1, description="Prompt + max_tokens limit per minute (None: auth.default)."
    )


class AuthConfig(BaseModel):
    """Optional API keys: `Authorization: Bearer <key>` on every /v1 call."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Require an API key on /v1 routes (401 without one).")
    keys: list[ApiKey] = Field(default_factory=list, description="Keys inline (hashed).")
    keys_file: Path | None = Field(
        None, description="JSON list of keys (same fields), e.g. a mounted Kubernetes secret."
    )
    keys_env: str | None = Field(
        None, description="Environment variable holding the JSON list of keys (e.g. from a secret)."
    )
    default_requests_per_min: int = Field(600, ge=1, description="Request limit of keys that set none.")
    default_tokens_per_min: int = Field(2_000_000, ge=1, description="Token limit of keys that set none.")

"""KV-cache tier settings: the store, block size, write-behind queue and failure policy."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class MemoryStoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["memory"] = Field("memory", description="Embedded in-process LRU (one replica only).")
    capacity_bytes: int = Field(1 << 30, gt=0, description="Bytes kept before least-recently-used blocks go.")


class RedisBulkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["redis"] = Field("redis", description="Block values travel to the same Redis as the index.")


class MooncakeBulkConfig(BaseModel):
    """Mooncake's distributed store (RDMA) for block values; Redis keeps the index."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["mooncake"] = Field("mooncake", description="Mooncake transfer engine + store.")
    master_server: str = Field(description="host:port of mooncake_master.")
    metadata_server: str = Field(
        description="Transfer-engine metadata URL, e.g. http://master:8080/metadata."
    )
    local_hostname: str = Field(description="This node's address as the other nodes reach it.")
    protocol: Literal["rdma", "tcp"] = Field("rdma", description="Wire between nodes.")
    rdma_devices: str = Field("", description="Comma-separated NICs (mlx5_0,...); empty: auto.")
    global_segment_bytes: int = Field(
        16 << 30, gt=0, description="Memory this node contributes to the distributed pool."
    )
    local_buffer_bytes: int = Field(1 << 30, gt=0, description="Registered staging buffer per node.")


BulkConfig = Annotated[RedisBulkConfig | MooncakeBulkConfig, Field(discriminator="type")]


class RedisStoreConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["redis"] = Field("redis", description="Redis shared by every replica.")
    url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="redis://[:password@]host:port/db, rediss:// (TLS) or unix://path.",
    )
    password_env: str | None = Field(
        None,
        description="Environment variable holding the Redis password (e.g. from a Kubernetes Secret), "
        "used instead of one in the URL, so the password is in no config or manifest.",
    )
    max_connections: int = Field(32, ge=1, description="Connection pool size per replica.")
    socket_timeout_s: float = Field(5.0, gt=0, description="Per-command timeout; slower answers are misses.")
    ttl_s: int | None = Field(
        24 * 3600, ge=1, description="Expiry of stored blocks (None: rely on eviction)."
    )
    bulk: BulkConfig = Field(
        default_factory=RedisBulkConfig,
        description="Transport for block values (Redis itself, or Mooncake over RDMA).",
    )
    max_value_bytes: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="Blocks larger than this are not stored (Redis' hard limit: 512 MB).",
    )


StoreConfig = Annotated[MemoryStoreConfig | RedisStoreConfig, Field(discriminator="type")]


class BreakerConfig(BaseModel):
    """How long a KV-tier call may take on the engine's path, and how an unhealthy store is retried."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True, description="Open on the first failed or timed-out call (off: every call waits)."
    )
    lookup_timeout_s: float = Field(
        0.5, gt=0, description="Deadline of one lookup or load on the engine thread (Redis answers in ms)."
    )
    store_timeout_s: float = Field(10.0, gt=0, description="Deadline of one batch of stores (writer thread).")
    backoff_s: float = Field(2.0, gt=0, description="First wait before probing an unhealthy store.")
    max_backoff_s: float = Field(30.0, gt=0, description="The probe interval doubles up to this.")
    probe_timeout_s: float = Field(1.0, gt=0, description="Deadline of one probe (PING).")


class KVTierConfig(BaseModel):
    """A shared KV tier: prefill once, reuse on any replica."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Store and reuse prompt KV through the tier.")
    store: StoreConfig = Field(default_factory=MemoryStoreConfig, description="Where blocks live.")
    block_size: int = Field(
        256, gt=0, description="Tokens per stored block; a multiple of engine.block_size."
    )
    write_queue_blocks: int = Field(
        256,
        ge=1,
        description="Blocks waiting to be stored; above this stores are dropped (decoding never waits).",
    )
    required: bool = Field(False, description="Refuse to start when the store is unreachable.")
    breaker: BreakerConfig = Field(
        default_factory=lambda: BreakerConfig(),
        description="Skip a stalled or dead store after one timeout; probe it in the background.",
    )
    key_prefix: str = Field("mvkv", min_length=1, description="Prefix of every key (share one Redis safely).")

"""Expert-parallel settings: EP degree, placement, transport, load window, rebalancing."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RayTransportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["ray"] = Field("ray", description="Ray actor calls; arrays via the object store.")
    compiled: bool = Field(
        False,
        description="Use a Ray compiled graph (shared-memory channels, ~4x less call overhead); it binds the "
        "workers to one engine, so it needs a single engine replica.",
    )


class NcclTransportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["nccl"] = Field("nccl", description="torch.distributed all-to-all collectives (GPU nodes).")
    backend: Literal["nccl", "gloo"] = Field(
        "nccl", description="nccl between GPUs; gloo runs the same exchanges on CPU (tests, CPU clusters)."
    )
    master_port: int = Field(29511, ge=1, le=65535, description="Rendezvous port of the process group.")
    timeout_s: float = Field(
        120.0, gt=0, description="A collective that waits longer (a worker died) fails instead of hanging."
    )


TransportConfig = Annotated[RayTransportConfig | NcclTransportConfig, Field(discriminator="type")]


class PlacementEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: int = Field(description="MoE layer index.")
    expert: int = Field(description="Routed expert index within the layer.")
    workers: list[int] = Field(min_length=1, description="Expert workers holding it (replicas).")


class RebalanceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="Rebalance between engine steps from observed loads.")
    interval_steps: int = Field(200, ge=1, description="Steps between rebalancing checks.")
    imbalance_threshold: float = Field(
        1.25, ge=1.0, description="Rebalance when max/mean worker load exceeds this."
    )
    redundant_slots_per_worker: int = Field(
        1, ge=0, description="Spare expert slots per worker per layer for copies of hot experts."
    )


class ExpertsConfig(BaseModel):
    """How routed experts are placed. `local`: in the engine (EP=1). `disaggregated`: on
    `ep_degree` expert workers shared by all engine replicas."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["local", "disaggregated"] = Field("local", description="Where routed experts run.")
    ep_degree: int = Field(1, ge=1, description="Expert workers (disaggregated mode).")
    worker_num_cpus: float = Field(1.0, ge=0, description="Logical CPUs per expert worker.")
    worker_num_gpus: float = Field(0.0, ge=0, description="GPUs per expert worker (1 on GPU nodes).")
    worker_device: str = Field("cpu", description="Torch device of expert workers.")
    worker_custom_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per expert worker (the Helm chart sets maverick-experts: 1).",
    )
    worker_threads: int | None = Field(None, ge=1, description="torch threads per CPU expert worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy for the workers across nodes."
    )
    placement: list[PlacementEntry] = Field(
        default_factory=list,
        description="Explicit (layer, expert) → workers; others use the contiguous layout.",
    )
    transport: TransportConfig = Field(
        default_factory=RayTransportConfig, description="Dispatch/combine transport."
    )
    load_window_steps: int = Field(256, ge=1, description="Engine steps in the load-statistics window.")
    rebalance: RebalanceConfig = Field(
        default_factory=RebalanceConfig, description="Load-driven rebalancing."
    )
    max_retries: int = Field(3, ge=0, description="Fail-overs tried for one MoE layer call before giving up.")
    name_prefix: str = Field("maverick-experts", description="Ray actor name prefix (shared tier lookup).")
    engines_per_group: int | None = Field(
        None,
        ge=1,
        description="Engine replicas one EP group of ep_degree workers serves: the tier then runs "
        "ceil(engine replicas / this) groups, each started with the first engine replica that "
        "needs it and stopped with the last one that leaves it, so the expert workers follow the "
        "engine tier when it scales. None: one group that every engine replica shares, always up.",
    )
    group_lease_s: float = Field(
        30.0,
        gt=0,
        description="With engines_per_group: an engine replica renews its place in its group this "
        "often / 3; one that died without leaving is dropped after this, and its group stopped if "
        "it was the last.",
    )
    replace_dead_workers: bool = Field(
        True,
        description="Start a replacement for a dead expert worker in its placement-group bundle and "
        "move its experts back once it has loaded them (meanwhile the survivors serve them). Ray "
        "transports only: an NCCL process group cannot take a new rank.",
    )

    @model_validator(mode="after")
    def _check(self) -> ExpertsConfig:
        if self.mode == "local" and self.ep_degree != 1:
            raise ValueError("experts.ep_degree > 1 needs experts.mode: disaggregated")
        if self.worker_device.startswith("cuda") and self.worker_num_gpus == 0:
            raise ValueError("experts.worker_device is CUDA but experts.worker_num_gpus is 0")
        if self.engines_per_group not in (None, 1) and (
            self.transport.type == "nccl" or getattr(self.transport, "compiled", False)
        ):
            raise ValueError(
                f"experts.engines_per_group={self.engines_per_group}: the {self.transport.type} "
                "transport binds a group's workers to one engine; use engines_per_group: 1"
            )
        return self

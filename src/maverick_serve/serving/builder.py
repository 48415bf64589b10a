"""Builders: `ClusterConfig` → Ray Serve application.

One builder serves the CLI (`maverick-serve up`), the tests, `serve run deployments/*.yaml`
(through `app_builder`) and the Helm chart. Deployment classes stay plain; options are applied
here, so nothing is decorated at import time.
"""

from __future__ import annotations

import math
from typing import Any

from ray import serve
from ray.serve import Application

from maverick_serve.autoscaling.serve_policy import APP_POLICY_PATH, TIER_POLICY_PATH
from maverick_serve.config.cluster import ClusterConfig, ReplicaResources
from maverick_serve.config.engine import VllmEngineConfig
from maverick_serve.routing.hub import ReplicaStateHub
from maverick_serve.serving.colocated_server import ColocatedServer
from maverick_serve.serving.engine_server import EngineServer
from maverick_serve.serving.model_store import ensure_model
from maverick_serve.serving.router_server import RouterServer

ROUTER_DEPLOYMENT = "Router"
ENGINE_DEPLOYMENT = "LlamaEngine"
PREFILL_DEPLOYMENT = "LlamaPrefill"
STATE_HUB_DEPLOYMENT = "ReplicaStateHub"
TIER_OF_DEPLOYMENT = {ROUTER_DEPLOYMENT: "router", ENGINE_DEPLOYMENT: "engine", PREFILL_DEPLOYMENT: "prefill"}
RANKED_ROUTER = "maverick_serve.serving.request_router:RankedRequestRouter"


def deployment_options(config: ClusterConfig) -> dict[str, dict[str, Any]]:
    """Serve options per deployment, from the config (exposed for tests and the Helm chart)."""
    r, e, p = config.resources.router, config.resources.engine, config.disaggregation.prefill
    logging_config = {
        "enable_access_log": config.observability.access_log,
        "log_level": config.observability.log_level,
    }
    options: dict[str, dict[str, Any]] = {
        ROUTER_DEPLOYMENT: {
            "name": ROUTER_DEPLOYMENT,
            "num_replicas": r.replicas,
            "graceful_shutdown_timeout_s": r.graceful_shutdown_timeout_s,
            "max_ongoing_requests": r.max_ongoing_requests,
            "ray_actor_options": {
                "num_cpus": r.num_cpus,
                "num_gpus": r.num_gpus,
                "resources": r.custom_resources,
            },
            "logging_config": logging_config,
        },
        ENGINE_DEPLOYMENT: {
            "name": ENGINE_DEPLOYMENT,
            "num_replicas": e.replicas,
            "graceful_shutdown_timeout_s": e.graceful_shutdown_timeout_s,
            "max_ongoing_requests": e.max_ongoing_requests,
            "ray_actor_options": {
                "num_cpus": e.num_cpus,
                "num_gpus": e.num_gpus,
                "resources": e.custom_resources,
            },
            "health_check_period_s": 5,
            "logging_config": logging_config,
            # Serve follows the ranking our Router's policy attaches to each request.
            "request_router_config": {"request_router_class": RANKED_ROUTER},
        },
        STATE_HUB_DEPLOYMENT: {
            "name": STATE_HUB_DEPLOYMENT,
            "num_replicas": 1,
            "max_ongoing_requests": 10_000,  # tiny synchronous calls from every replica and router
            "ray_actor_options": {"num_cpus": 0},
            "logging_config": logging_config,
        },
        PREFILL_DEPLOYMENT: {
            "name": PREFILL_DEPLOYMENT,
            "num_replicas": p.replicas,
            "graceful_shutdown_timeout_s": p.graceful_shutdown_timeout_s,
            "max_ongoing_requests": p.max_ongoing_requests,
            "ray_actor_options": {
                "num_cpus": p.num_cpus,
                "num_gpus": p.num_gpus,
                "resources": p.custom_resources,
            },
            "health_check_period_s": 5,
            "logging_config": logging_config,
        },
    }
    if config.router.colocated:  # HTTP requests carry no ranking: Serve's own choice by queue length
        del options[ENGINE_DEPLOYMENT]["request_router_config"]
        del options[ROUTER_DEPLOYMENT], options[STATE_HUB_DEPLOYMENT]
    single_node = isinstance(config.engine, VllmEngineConfig) and (
        config.engine.pipeline_parallel_size == config.engine.data_parallel_size == 1
    )
    for name, resources in ((ENGINE_DEPLOYMENT, e), (PREFILL_DEPLOYMENT, p)):  # prefill replicas are engines
        bundles = engine_placement_bundles(config, resources)
        if bundles:  # vLLM over several GPUs: its Ray workers take the GPUs, the replica sits in bundle 0
            deployment = options[name]
            deployment["ray_actor_options"]["num_gpus"] = 0
            deployment["placement_group_bundles"] = bundles
            deployment["placement_group_strategy"] = "STRICT_PACK" if single_node else "PACK"
    if config.autoscaling.enabled:
        for name in scaled_deployments(config):
            tier = TIER_OF_DEPLOYMENT[name]
            scaling = tier_autoscaling(config, tier)
            del options[name]["num_replicas"]
            options[name]["autoscaling_config"] = scaling["autoscaling_config"]
            options[name]["ray_actor_options"]["runtime_env"] = {"env_vars": scaling["env_vars"]}
    return options


def engine_placement_bundles(
    config: ClusterConfig, resources: ReplicaResources | None = None
) -> list[dict[str, float]]:
    """One GPU bundle per vLLM rank of an engine (or prefill: `resources`) replica that spans GPUs
    (tensor × pipeline × data parallel), the replica's own CPUs and custom resources in bundle 0;
    [] otherwise."""
    e = resources or config.resources.engine
    if not isinstance(config.engine, VllmEngineConfig) or e.num_gpus == 0:
        return []
    ranks = config.engine.gpus_per_replica
    if ranks == 1:
        return []
    first = {"CPU": e.num_cpus, "GPU": 1.0, **e.custom_resources}
    return [first] + [{"GPU": 1.0} for _ in range(ranks - 1)]


def scaled_deployments(config: ClusterConfig) -> list[str]:
    tiers = config.scaled_tiers()
    return [name for name, tier in TIER_OF_DEPLOYMENT.items() if tier in tiers]


def tier_autoscaling(config: ClusterConfig, tier: str) -> dict[str, Any]:
    """Serve options that hand a tier's replica count to our policy (Serve's delays off)."""
    a = config.autoscaling
    t = getattr(a, tier)
    push = str(a.metrics_push_interval_s)
    return {
        "autoscaling_config": {
            "min_replicas": t.min_replicas,
            "max_replicas": t.max_replicas,
            # Prefill may start at zero; engines and routers start with one so the app is ready.
            "initial_replicas": t.min_replicas if tier == "prefill" else max(t.min_replicas, 1),
            "upscale_delay_s": 0,
            "downscale_delay_s": 0,
            "downscale_to_zero_delay_s": 0,
            # Only Serve's aggregate uses it (the policy reads the raw series and keeps its own
            # windows); above Serve's 10 s default metrics interval, which it must exceed.
            "look_back_period_s": max(a.metrics_push_interval_s * 2, 10.5),
            "policy": {
                "policy_function": TIER_POLICY_PATH,
                "policy_kwargs": {
                    "tier": tier,
                    "config": t.model_dump(mode="json"),
                    **(
                        {"prometheus": a.prometheus.model_dump(mode="json")}
                        if tier == "engine" and a.prometheus.enabled
                        else {}
                    ),
                },
            },
        },
        # Replicas push their stats this often (Serve reads the interval from the environment).
        "env_vars": {"RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": push},
    }


def application_autoscaling_policy(config: ClusterConfig) -> dict[str, Any] | None:
    """The app-level `autoscaling_policy` of the Serve application (None when autoscaling is off):
    every tier in one policy, inside one GPU budget."""
    if not config.autoscaling.enabled:
        return None
    return {
        "policy_function": APP_POLICY_PATH,
        "policy_kwargs": {"deployments": TIER_OF_DEPLOYMENT, "cluster": config.model_dump(mode="json")},
    }


def serve_application(config: ClusterConfig, route_prefix: str = "/") -> dict[str, Any]:
    """The app as one entry of a Serve config file's `applications` (what `serve deploy`, the
    dashboard's REST API and KubeRay's serveConfigV2 take)."""
    app: dict[str, Any] = {
        "name": config.app_name,
        "route_prefix": route_prefix,
        "import_path": "maverick_serve.serving.builder:app_builder",
        "args": config.model_dump(mode="json"),
    }
    policy = application_autoscaling_policy(config)
    if policy is not None:
        app["autoscaling_policy"] = policy
    return app


def required_resources(config: ClusterConfig) -> dict[str, float]:
    """Logical CPUs and GPUs the app needs once every replica and expert worker is placed."""
    r, e, x = config.resources.router, config.resources.engine, config.experts
    p = config.disaggregation.prefill if config.disaggregation.enabled else None
    workers = x.ep_degree if x.mode == "disaggregated" else 0
    if workers and x.engines_per_group is not None:  # groups follow the replicas: at start, packed
        workers *= math.ceil(e.replicas / x.engines_per_group) + (
            math.ceil(p.replicas / x.engines_per_group) if p else 0
        )
    routers = 0 if config.router.colocated else r.replicas  # colocated: inside the engine replicas
    return {
        "CPU": routers * r.num_cpus
        + e.replicas * e.num_cpus
        + workers * x.worker_num_cpus
        + (p.replicas * p.num_cpus if p else 0),
        "GPU": routers * r.num_gpus
        + e.replicas * (len(engine_placement_bundles(config)) or e.num_gpus)
        + workers * x.worker_num_gpus
        + (p.replicas * (len(engine_placement_bundles(config, p)) or p.num_gpus) if p else 0),
    }


def check_cluster_fit(config: ClusterConfig, cluster: dict[str, float]) -> None:
    """Fail at build time, naming what does not fit, instead of replicas pending forever."""
    for key, need in required_resources(config).items():
        have = cluster.get(key, 0.0)
        if need > have:
            raise ValueError(
                f"the app needs {need:g} {key} (router + engine replicas + expert workers) but the Ray "
                f"cluster has {have:g}; lower resources.*.replicas / num_{key.lower()}s or "
                "experts.ep_degree, or add nodes"
            )


def build_app(config: ClusterConfig) -> Application:
    import ray

    if ray.is_initialized() and config.resources.check_cluster_fit:
        check_cluster_fit(config, ray.cluster_resources())
    config = ensure_model(config)
    payload = config.model_dump(mode="json")
    options = deployment_options(config)
    prefill = None
    if config.disaggregation.enabled:
        prefill = serve.deployment(**options[PREFILL_DEPLOYMENT])(EngineServer).bind(payload)
    if config.router.colocated:  # each engine replica is its own router and the ingress
        colocated = serve.deployment(**options[ENGINE_DEPLOYMENT])(serve.ingress()(ColocatedServer))
        return colocated.bind(payload, prefill)
    hub = serve.deployment(**options[STATE_HUB_DEPLOYMENT])(ReplicaStateHub).bind(
        expiry_s=config.router.routing.hub_expiry_s()
    )
    engine = serve.deployment(**options[ENGINE_DEPLOYMENT])(EngineServer)
    router = serve.deployment(**options[ROUTER_DEPLOYMENT])(serve.ingress()(RouterServer))
    return router.bind(payload, engine.bind(payload, hub), prefill, hub)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry point of Serve config files: `import_path: maverick_serve.serving.builder:app_builder`."""
    return build_app(ClusterConfig.model_validate(args))

"""The root config, every Serve YAML in deployments/, and the builder's deployment options."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.config.engine import VllmEngineConfig
from maverick_serve.serving.builder import (
    ENGINE_DEPLOYMENT,
    ROUTER_DEPLOYMENT,
    deployment_options,
    serve_application,
)

DEPLOYMENTS = sorted((Path(__file__).parents[2] / "deployments").glob("*.yaml"))


def test_deployment_files_exist() -> None:
    names = {p.name for p in DEPLOYMENTS}
    assert {"local-cpu.yaml", "maverick-8xh100.yaml", "scout-10m-8xh200.yaml"} <= names


@pytest.mark.parametrize("path", DEPLOYMENTS, ids=lambda p: p.name)
def test_every_deployment_file_validates(path: Path) -> None:
    data = yaml.safe_load(path.read_text())
    assert data["applications"], path
    for app in data["applications"]:
        module, _, attr = app["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
        cfg = ClusterConfig.model_validate(app["args"])
        assert cfg.app_name == app["name"]
        opts = deployment_options(cfg)
        engine = opts[ENGINE_DEPLOYMENT]
        bundles = engine.get("placement_group_bundles")
        if bundles:  # vLLM over several GPUs: the bundles hold the GPUs, the replica actor none
            assert sum(b.get("GPU", 0) for b in bundles) == cfg.resources.engine.num_gpus
            assert engine["ray_actor_options"]["num_gpus"] == 0
        else:
            assert engine["ray_actor_options"]["num_gpus"] == cfg.resources.engine.num_gpus
        if "autoscaling_policy" in app:  # what `up` and the chart would write for these args
            ours, theirs = serve_application(cfg)["autoscaling_policy"], app["autoscaling_policy"]
            assert theirs["policy_function"] == ours["policy_function"]
            assert theirs["policy_kwargs"]["deployments"] == ours["policy_kwargs"]["deployments"]
            assert ClusterConfig.model_validate(theirs["policy_kwargs"]["cluster"]) == cfg


def test_gpu_files_ask_for_gpus_and_local_runs_on_cpu() -> None:
    by_name = {p.name: yaml.safe_load(p.read_text())["applications"][0]["args"] for p in DEPLOYMENTS}
    local = ClusterConfig.model_validate(by_name["local-cpu.yaml"])
    assert local.engine.device == "cpu" and local.resources.engine.num_gpus == 0
    assert local.resources.engine.replicas == 2
    mav = ClusterConfig.model_validate(by_name["maverick-8xh100.yaml"])
    assert isinstance(mav.engine, VllmEngineConfig) and mav.engine.tensor_parallel_size == 8
    assert mav.resources.engine.num_gpus == 8 and mav.engine.max_model_len == 430000
    scout = ClusterConfig.model_validate(by_name["scout-10m-8xh200.yaml"])
    assert isinstance(scout.engine, VllmEngineConfig) and scout.engine.kv_cache_dtype == "fp8"
    assert scout.engine.max_model_len == 10485760
    ep = ClusterConfig.model_validate(by_name["maverick-ep-2x8xh100-vllm.yaml"])
    assert isinstance(ep.engine, VllmEngineConfig) and ep.engine.enable_expert_parallel
    assert ep.engine.gpus_per_replica == ep.resources.engine.num_gpus == 16


def test_unknown_field_is_named() -> None:
    with pytest.raises(ValidationError, match=r"resources\.engine\.replica"):
        ClusterConfig.model_validate({"resources": {"engine": {"replica": 2}}})


def test_cuda_without_gpus_is_refused() -> None:
    with pytest.raises(ValidationError, match="num_gpus is 0"):
        ClusterConfig.model_validate({"engine": {"device": "cuda"}})


def test_router_image_limit_cannot_exceed_engine_limit() -> None:
    with pytest.raises(ValidationError, match=r"router\.max_images_per_request"):
        ClusterConfig.model_validate({"router": {"max_images_per_request": 9}})


def test_every_field_has_a_description() -> None:
    def walk(model: type) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            if not field.description:
                missing.append(f"{model.__name__}.{name}")
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                missing += walk(ann)
        return missing

    assert walk(ClusterConfig) == []


def test_options_follow_config() -> None:
    cfg = ClusterConfig.model_validate(
        {"resources": {"engine": {"replicas": 3, "num_cpus": 2, "custom_resources": {"maverick-engine": 1}}}}
    )
    opts = deployment_options(cfg)
    assert opts[ENGINE_DEPLOYMENT]["num_replicas"] == 3
    assert opts[ENGINE_DEPLOYMENT]["ray_actor_options"] == {
        "num_cpus": 2.0,
        "num_gpus": 0.0,
        "resources": {"maverick-engine": 1.0},
    }
    assert opts[ROUTER_DEPLOYMENT]["name"] == "Router"


def test_cluster_fit_is_checked_at_build() -> None:
    from maverick_serve.serving.builder import check_cluster_fit, required_resources

    cfg = ClusterConfig.model_validate(
        {
            "experts": {"mode": "disaggregated", "ep_degree": 4, "worker_num_cpus": 2},
            "resources": {"engine": {"replicas": 2, "num_cpus": 1}},
        }
    )
    assert required_resources(cfg) == {"CPU": 0.5 + 2 + 8, "GPU": 0.0}
    check_cluster_fit(cfg, {"CPU": 16.0})
    with pytest.raises(ValueError, match=r"needs 10.5 CPU .* cluster has 8"):
        check_cluster_fit(cfg, {"CPU": 8.0})
    gpu = ClusterConfig.model_validate(
        {"experts": {"mode": "disaggregated", "ep_degree": 8, "worker_num_gpus": 1, "worker_device": "cuda"}}
    )
    with pytest.raises(ValueError, match="needs 8 GPU"):
        check_cluster_fit(gpu, {"CPU": 64.0, "GPU": 4.0})


def test_ep_above_one_needs_disaggregated_mode() -> None:
    with pytest.raises(ValidationError, match=r"needs experts\.mode: disaggregated"):
        ClusterConfig.model_validate({"experts": {"ep_degree": 2}})


def test_disaggregation_needs_a_shared_tier() -> None:
    with pytest.raises(ValidationError, match=r"set kvtier\.store\.type: redis"):
        ClusterConfig.model_validate({"disaggregation": {"enabled": True}})
    cfg = ClusterConfig.model_validate(
        {
            "disaggregation": {"enabled": True},
            "kvtier": {"store": {"type": "redis", "url": "redis://r:6379/0"}},
        }
    )
    assert cfg.kvtier.block_size == 256


def test_redis_password_comes_from_the_named_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from maverick_serve.kvtier.store_factory import redis_url

    assert redis_url("redis://r:6379/0", None) == "redis://r:6379/0"
    monkeypatch.setenv("MAVERICK_REDIS_PASSWORD", "p@ss:w/rd")
    assert redis_url("redis://r:6379/0", "MAVERICK_REDIS_PASSWORD") == "redis://:p%40ss%3Aw%2Frd@r:6379/0"
    assert redis_url("rediss://:old@r:6380/1?ssl_ca_certs=/ca", "MAVERICK_REDIS_PASSWORD") == (
        "rediss://:p%40ss%3Aw%2Frd@r:6380/1?ssl_ca_certs=/ca"
    )
    assert redis_url("unix:///run/redis.sock?db=0", "MAVERICK_REDIS_PASSWORD") == (
        "unix:///run/redis.sock?db=0&password=p%40ss%3Aw%2Frd"
    )
    monkeypatch.delenv("MAVERICK_REDIS_PASSWORD")
    with pytest.raises(RuntimeError, match="MAVERICK_REDIS_PASSWORD, which is not set"):
        redis_url("redis://r:6379/0", "MAVERICK_REDIS_PASSWORD")

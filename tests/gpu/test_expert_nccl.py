"""Expert parallelism over NCCL: the engine (rank 0) and expert workers each on their own GPU.

Needs Ray and at least ep + 1 CUDA GPUs (NCCL refuses two ranks on one GPU); skipped otherwise.
The same all-to-all code runs on CPU with gloo in tests/integration/test_expert_parallel.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from maverick_serve.config import NativeEngineConfig
from maverick_serve.config.experts import ExpertsConfig
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.engine.types import EngineRequest, SamplingParams
from maverick_serve.net import free_port
from maverick_serve.serving.engine_factory import load_native_engine

pytestmark = pytest.mark.gpu
EP = 2


@pytest.mark.skipif(torch.cuda.device_count() < EP + 1, reason=f"needs {EP + 1} GPUs for NCCL ranks")
def test_nccl_expert_parallel_matches_local(tiny_model: Path) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=8, num_gpus=torch.cuda.device_count(), include_dashboard=False)
    port = free_port()
    cfg = NativeEngineConfig(device="cuda", kv_cache_memory_gib=0.2)
    experts = ExpertsConfig(
        mode="disaggregated",
        ep_degree=EP,
        worker_num_gpus=1,
        worker_device="cuda",
        transport={"type": "nccl", "backend": "nccl", "master_port": port},
    )
    prompts = [
        torch.randint(0, 1900, (30 + 10 * i,), generator=torch.Generator().manual_seed(i)).tolist()
        for i in range(4)
    ]

    def generate(engine: NativeEngine) -> dict[str, list[int]]:
        for i, p in enumerate(prompts):
            engine.add_request(
                EngineRequest(str(i), p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
            )
        out: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        return out

    try:
        local = generate(NativeEngine.from_pretrained(tiny_model, cfg))
        remote_engine = load_native_engine(tiny_model, cfg, experts)
        assert generate(remote_engine) == local
        assert remote_engine.expert_tier is not None
        remote_engine.expert_tier.shutdown()
    finally:
        ray.shutdown()

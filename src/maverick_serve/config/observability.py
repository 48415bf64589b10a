"""Metrics, logs and traces: what replicas export and where it goes.

Traces ride on Ray Serve's own tracing (one tracer provider per process, set by Serve in the
proxy and in every replica; handle calls carry the context). Serve reads its switch from the
environment of each process, so this section resolves to environment variables
(`TracingConfig.environment`) that `maverick-serve up` sets before Ray starts and the Helm chart
puts on every pod. The standard OpenTelemetry variables are honoured as defaults.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

EXPORTER_IMPORT_PATH = "maverick_serve.observability.tracing:span_processors"
DEFAULT_OTLP_ENDPOINT = "http://localhost:4318"
DEFAULT_SAMPLING_RATIO = 0.01
# Ours, read by the exporter hook in each process (Serve calls it with no arguments).
ENV_RECORD_CONTENT = "MAVERICK_TRACING_RECORD_CONTENT"
ENV_EXPORT_TIMEOUT = "MAVERICK_TRACING_EXPORT_TIMEOUT_S"
ENV_ENGINE_STEPS = "MAVERICK_TRACING_ENGINE_STEPS"


class TracingConfig(BaseModel):
    """OpenTelemetry traces of every request (router → prefill → KV tier → engine), over OTLP."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = Field(
        None,
        description="Trace requests. None: on when OTEL_EXPORTER_OTLP_ENDPOINT (or _TRACES_ENDPOINT) "
        "is set in the environment, else off.",
    )
    endpoint: str | None = Field(
        None,
        description="OTLP/HTTP base URL (spans go to <endpoint>/v1/traces). None: "
        f"OTEL_EXPORTER_OTLP_ENDPOINT, else {DEFAULT_OTLP_ENDPOINT}.",
    )
    protocol: Literal["http/protobuf"] = Field(
        "http/protobuf",
        description="OTLP protocol. Only http/protobuf is installed; OTEL_EXPORTER_OTLP_PROTOCOL=grpc "
        "is refused with a message instead of silently exporting nothing.",
    )
    sampling_ratio: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Fraction of new traces recorded (a client's sampled traceparent is always "
        "followed). None: OTEL_TRACES_SAMPLER/_ARG (always_on, always_off, traceidratio and their "
        f"parentbased_ forms), else {DEFAULT_SAMPLING_RATIO}.",
    )
    record_content: bool = Field(
        False, description="Put prompt and completion text on spans. Off: only sizes and ids are recorded."
    )
    engine_steps: bool = Field(
        False,
        description="Opt-in detail: one `engine.step` span per engine step a traced request was in, "
        "with the seconds its MoE layers waited on the expert workers (up to 512 per request).",
    )
    service_name: str = Field("maverick-serve", min_length=1, description="OTel service.name of spans.")
    max_queue_size: int = Field(
        2048, ge=1, description="Spans buffered per process before new ones are dropped (and counted)."
    )
    export_timeout_s: float = Field(
        5.0, gt=0, description="Per-batch export timeout; an unreachable endpoint never blocks requests."
    )

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must be an http:// or https:// URL, got {v!r}")
        return v

    def resolve(self, environ: Mapping[str, str] | None = None) -> ResolvedTracing:
        """This section with the standard environment variables filled in (config wins)."""
        env = os.environ if environ is None else environ
        endpoint = self.endpoint or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None
        traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or None
        enabled = self.enabled if self.enabled is not None else bool(endpoint or traces_endpoint)
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        if enabled and protocol and protocol != "http/protobuf":
            raise ValueError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: only http/protobuf is installed "
                "(observability.tracing.protocol); point the endpoint at the collector's HTTP port (4318)"
            )
        ratio = self.sampling_ratio
        if ratio is None:
            ratio = sampling_ratio_from_env(env)
        return ResolvedTracing(
            enabled=enabled,
            endpoint=endpoint or DEFAULT_OTLP_ENDPOINT,
            traces_endpoint=traces_endpoint,
            sampling_ratio=ratio,
            record_content=self.record_content,
            engine_steps=self.engine_steps,
            service_name=env.get("OTEL_SERVICE_NAME") or self.service_name,
            max_queue_size=self.max_queue_size,
            export_timeout_s=self.export_timeout_s,
        )


def sampling_ratio_from_env(env: Mapping[str, str]) -> float:
    """OTEL_TRACES_SAMPLER/_ARG as Serve's parent-based ratio sampler understands them."""
    sampler = (env.get("OTEL_TRACES_SAMPLER") or "").strip().lower()
    arg = env.get("OTEL_TRACES_SAMPLER_ARG")
    if sampler in ("always_on", "parentbased_always_on"):
        return 1.0
    if sampler in ("always_off", "parentbased_always_off"):
        return 0.0
    if sampler in ("", "traceidratio", "parentbased_traceidratio"):
        if arg is None or arg == "":
            return 1.0 if sampler else DEFAULT_SAMPLING_RATIO  # the spec's default arg is 1.0
        try:
            value = float(arg)
        except ValueError:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={arg!r} is not a number in [0, 1]") from None
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={arg!r} is outside [0, 1]")
        return value
    raise ValueError(
        f"OTEL_TRACES_SAMPLER={sampler!r} is not supported (always_on, always_off, traceidratio, "
        "parentbased_*): Serve samples with a parent-based ratio"
    )


class ResolvedTracing(BaseModel):
    """Tracing as every process will run it."""

    enabled: bool
    endpoint: str
    traces_endpoint: str | None
    sampling_ratio: float
    record_content: bool
    engine_steps: bool
    service_name: str
    max_queue_size: int
    export_timeout_s: float

    def environment(self) -> dict[str, str]:
        """The variables that turn it on in every Ray process (proxy and replicas)."""
        if not self.enabled:
            return {}
        env = {
            "RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH": EXPORTER_IMPORT_PATH,
            "RAY_SERVE_TRACING_SAMPLING_RATIO": repr(self.sampling_ratio),
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_SERVICE_NAME": self.service_name,
            "OTEL_BSP_MAX_QUEUE_SIZE": str(self.max_queue_size),
            ENV_EXPORT_TIMEOUT: repr(self.export_timeout_s),
            ENV_RECORD_CONTENT: "1" if self.record_content else "0",
            ENV_ENGINE_STEPS: "1" if self.engine_steps else "0",
        }
        if self.traces_endpoint:
            env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = self.traces_endpoint
        return env

    def describe(self) -> str:
        if not self.enabled:
            return "off (set observability.tracing.enabled or OTEL_EXPORTER_OTLP_ENDPOINT)"
        where = self.traces_endpoint or self.endpoint.rstrip("/") + "/v1/traces"
        return f"OTLP/HTTP {where}, {self.sampling_ratio:.0%} of new traces sampled"


class ObservabilityConfig(BaseModel):
    """Metrics, logs and traces."""

    model_config = ConfigDict(extra="forbid")

    metrics_interval_s: float = Field(1.0, gt=0, description="How often engine replicas export their stats.")
    log_level: str = Field("INFO", description="Python log level of replicas.")
    access_log: bool = Field(
        False, description="Serve's per-request access log lines (off: ~1 ms less per hop on small machines)."
    )
    tracing: TracingConfig = Field(
        default_factory=TracingConfig, description="OpenTelemetry traces over OTLP/HTTP."
    )

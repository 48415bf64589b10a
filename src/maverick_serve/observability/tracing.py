"""Request traces on top of Ray Serve's tracing.

Serve owns the tracer provider of each process (proxy and replicas; a provider can be set once
per process) and calls `span_processors` — our exporter hook, named by
RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH — to fill it. Serve's spans (`proxy_http_request`,
`replica_handle_request`) carry the client's `traceparent` across the proxy and every handle call;
ours hang below them: the GenAI request span and router steps (`RequestTrace`), and engine stages
recorded after the fact from the engine's own timestamps (`record_span`), because they happen on
the engine's step thread where no request context exists.

Export is batched on a background thread with a bounded queue: an unreachable collector costs
dropped spans (counted in maverick_tracing_spans_dropped_total), never request latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from maverick_serve.config.observability import ENV_ENGINE_STEPS, ENV_EXPORT_TIMEOUT, ENV_RECORD_CONTENT
from maverick_serve.observability.catalogue import TRACING_METRICS
from maverick_serve.observability.ray_metrics import MetricSet

logger = logging.getLogger(__name__)
TRACER_NAME = "maverick_serve"
T = TypeVar("T")
_metrics_lock = threading.Lock()
_metrics: list[MetricSet] = []  # one per process, made on first export (the hook's own state)


def _tracing_metrics() -> MetricSet:
    with _metrics_lock:
        if not _metrics:
            _metrics.append(MetricSet(TRACING_METRICS))
        return _metrics[0]


class CountingExporter(SpanExporter):
    """Delegates to the OTLP exporter and counts what was delivered and what was lost."""

    def __init__(self, inner: SpanExporter) -> None:
        self.inner = inner
        self.exported = 0
        self.failed = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:  # the exporter must never raise into the worker thread
            logger.debug("span export raised", exc_info=True)
            result = SpanExportResult.FAILURE
        m = _tracing_metrics()
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
            m.inc("maverick_tracing_spans_exported", len(spans))
        else:
            self.failed += len(spans)
            m.inc("maverick_tracing_spans_dropped", len(spans), {"reason": "export_failed"})
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """The SDK's batch processor (bounded queue, background export), counting queue-full drops."""

    def __init__(self, exporter: SpanExporter, max_queue_size: int) -> None:
        # The SDK refuses a batch larger than the queue; a small queue means small batches.
        batch = min(max_queue_size, int(os.environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512")))
        super().__init__(exporter, max_queue_size=max_queue_size, max_export_batch_size=max(1, batch))
        self.max_queue_size = max_queue_size
        self.queue_full_drops = 0

    def on_end(self, span: ReadableSpan) -> None:
        queue = getattr(self._batch_processor, "_queue", None)  # the SDK drops the oldest when full
        if queue is not None and len(queue) >= self.max_queue_size and span.context.trace_flags.sampled:
            self.queue_full_drops += 1
            _tracing_metrics().inc("maverick_tracing_spans_dropped", 1, {"reason": "queue_full"})
        super().on_end(span)


def span_processors() -> list[SpanProcessor]:
    """Serve's exporter hook (no arguments): OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT (or
    _TRACES_ENDPOINT), batched with OTEL_BSP_MAX_QUEUE_SIZE spans at most."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    timeout = float(os.environ.get(ENV_EXPORT_TIMEOUT, "5"))
    queue = int(os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE", "2048"))
    return [CountingBatchSpanProcessor(CountingExporter(OTLPSpanExporter(timeout=timeout)), queue)]


def background_task(coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
    """A long-lived task started from a request handler, in an empty context: otherwise it
    inherits that request's span and every later poll it makes lands in that one trace."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


def record_content() -> bool:
    """Prompts and completions go on spans only when the operator opted in."""
    return os.environ.get(ENV_RECORD_CONTENT) == "1"


def engine_steps() -> bool:
    """Per-step engine spans (expert dispatch detail) only when the operator opted in."""
    return os.environ.get(ENV_ENGINE_STEPS) == "1"


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def _epoch_ns(monotonic_s: float) -> int:
    """A `time.monotonic()` stamp of this process as the epoch nanoseconds spans carry."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


def traceparent(span: Span) -> str | None:
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def span_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes without the unset ones (OTel refuses None values)."""
    return {k: v for k, v in attributes.items() if v is not None}


def record_span(
    name: str,
    start: float,
    end: float,
    attributes: Mapping[str, Any] | None = None,
    parent: otel_context.Context | None = None,
) -> None:
    """A finished span from two monotonic stamps, under `parent` (default: the current span)."""
    span = tracer().start_span(
        name, context=parent, start_time=_epoch_ns(start), attributes=span_attributes(attributes or {})
    )
    span.end(end_time=_epoch_ns(max(start, end)))


@contextlib.contextmanager
def step(name: str, **attributes: Any) -> Iterator[Span]:
    """A child span of the current one around a block."""
    with tracer().start_as_current_span(name, attributes=span_attributes(attributes)) as span:
        yield span


class RequestTrace:
    """The GenAI span of one API request (`{operation} {model}`): it outlives the handler when
    the response streams, so it is started and ended explicitly and made current with
    `activate()` while the handler runs (handle calls made then carry it to the engines)."""

    def __init__(self, operation: str, model: str, attributes: Mapping[str, Any]) -> None:
        self.model = model
        self.span = tracer().start_span(
            f"{operation} {model}",
            kind=SpanKind.SERVER,
            attributes=span_attributes(
                {"gen_ai.operation.name": operation, "gen_ai.request.model": model, **attributes}
            ),
        )
        self.context = trace.set_span_in_context(self.span)
        self.ended = False

    @property
    def recording(self) -> bool:
        return self.span.is_recording()

    @contextlib.contextmanager
    def activate(self) -> Iterator[None]:
        token = otel_context.attach(self.context)
        try:
            yield
        finally:
            otel_context.detach(token)

    def traceparent(self) -> str | None:
        return traceparent(self.span)

    def set(self, **attributes: Any) -> None:
        if self.recording:
            self.span.set_attributes(span_attributes(attributes))

    def end(self, status: int, error: str | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        self.span.set_attribute("http.response.status_code", status)
        if status >= 400:
            self.span.set_attribute("error.type", str(status))
            self.span.set_status(Status(StatusCode.ERROR, (error or "")[:200]))
        self.span.end()

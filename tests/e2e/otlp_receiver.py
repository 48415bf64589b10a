"""A minimal OTLP/HTTP trace receiver on a free port: decodes each ExportTraceServiceRequest
(protobuf, as the SDK's exporter sends it) and keeps the spans for assertions."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from maverick_serve.net import free_port


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    service: str


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


@dataclass
class OtlpReceiver:
    port: int = field(default_factory=free_port)
    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                msg = ExportTraceServiceRequest()
                msg.ParseFromString(body)
                with receiver.lock:
                    receiver.requests += 1
                    for rs in msg.resource_spans:
                        res = {a.key: _value(a.value) for a in rs.resource.attributes}
                        for ss in rs.scope_spans:
                            for s in ss.spans:
                                receiver.spans.append(
                                    ReceivedSpan(
                                        s.name,
                                        s.trace_id.hex(),
                                        s.span_id.hex(),
                                        s.parent_span_id.hex(),
                                        s.start_time_unix_nano,
                                        s.end_time_unix_nano,
                                        {a.key: _value(a.value) for a in s.attributes},
                                        str(res.get("service.name", "")),
                                    )
                                )
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def wait_for(
        self, trace_id: str, names: set[str], timeout_s: float = 30.0, counts: dict[str, int] | None = None
    ) -> list[ReceivedSpan]:
        """The trace once it has every name in `names`, and at least counts[name] spans of each
        name counted (replicas export on their own schedules: one replica's spans can arrive alone)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            spans = self.trace(trace_id)
            got = collections.Counter(s.name for s in spans)
            if all(got[n] for n in names) and all(got[n] >= k for n, k in (counts or {}).items()):
                return spans
            time.sleep(0.25)
        return self.trace(trace_id)

    def wait_complete(self, trace_id: str, root_parent: str, timeout_s: float = 30.0) -> list[ReceivedSpan]:
        """The trace once every span's parent has arrived (spans end and export out of order)."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.trace(trace_id)
            ids = {s.span_id for s in spans}
            dangling = {s.parent_span_id for s in spans} - ids - {root_parent}
            if (spans and not dangling) or time.monotonic() > deadline:
                return spans
            time.sleep(0.25)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

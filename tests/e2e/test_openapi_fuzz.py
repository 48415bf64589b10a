"""The live API fuzzed from its own /openapi.json with schemathesis: schema-valid and schema-invalid
bodies through the real proxy, router and engines. No 5xx; every status, content type, header and
body is one the document promises; invalid bodies are refused with a 4xx."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

# positive_data_acceptance is left out on purpose: a schema-valid request can still be refused for
# what no schema states (a prompt plus max_tokens past the context, a seat-less moment's 429).
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
EXAMPLES = 150  # per generation route and mode; derandomized, so CI replays the same cases
GENERATED_TOKENS = 8  # generation stays cheap on 2 CPU cores; limits are checked before this


# Each operation in each mode: GETs take no input, so only the generation routes get invalid bodies.
# (schemathesis' own pytest plugin needs an attribute pytest 9 removed, so hypothesis drives it.)
OPERATIONS = [
    ("/v1/chat/completions", "POST", GenerationMode.POSITIVE),
    ("/v1/chat/completions", "POST", GenerationMode.NEGATIVE),
    ("/v1/completions", "POST", GenerationMode.POSITIVE),
    ("/v1/completions", "POST", GenerationMode.NEGATIVE),
    ("/v1/models", "GET", GenerationMode.POSITIVE),
    ("/health", "GET", GenerationMode.POSITIVE),
    ("/ready", "GET", GenerationMode.POSITIVE),
]


@pytest.fixture(scope="module")
def live_schema(cluster: Any) -> Any:
    return schemathesis.openapi.from_url(f"{cluster.base_url}/openapi.json")


def _cheap(case: Any) -> None:
    """At most GENERATED_TOKENS per choice (no max_tokens would fill the context); every other
    field, valid or not, is left as generated."""
    if isinstance(case.body, dict) and ("messages" in case.body or "prompt" in case.body):
        for field in ("max_tokens", "max_completion_tokens"):
            value = case.body.get(field)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > GENERATED_TOKENS:
                case.body[field] = GENERATED_TOKENS
        if case.body.get("max_tokens") is None and case.body.get("max_completion_tokens") is None:
            case.body["max_tokens"] = GENERATED_TOKENS


@pytest.mark.parametrize(
    ("path", "method", "mode"), OPERATIONS, ids=[f"{m} {p} {g.value}" for p, m, g in OPERATIONS]
)
def test_every_operation_holds_to_its_document(live_schema: Any, path: str, method: str, mode: Any) -> None:
    examples = EXAMPLES if method == "POST" else 3
    strategy = live_schema[path][method].as_strategy(generation_mode=mode)

    @given(case=strategy)
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def run(case: Any) -> None:
        if mode == GenerationMode.POSITIVE:  # an invalid case stays exactly as generated
            _cheap(case)
        case.call_and_validate(checks=CHECKS, timeout=120)

    run()


def test_the_document_has_no_dangling_reference(cluster: Any) -> None:
    spec = httpx.get(f"{cluster.base_url}/openapi.json", timeout=30).json()
    refs = set(re.findall(r"'\$ref': '([^']+)'", str(spec)))
    schemas = spec["components"]["schemas"]
    assert {"TextPart", "StreamOptions", "ImagePart", "ErrorResponse"} <= set(schemas)
    assert refs and all(
        r.startswith("#/components/schemas/") and r.rsplit("/", 1)[1] in schemas for r in refs
    ), refs

"""`bench serve`'s hop lines: what HTTP + router add over a handle call, and how to read it when
the router sits in the engine replica (HTTP then skips the Ray hop the handle baseline takes)."""

from __future__ import annotations

from maverick_serve.bench.serve_bench import format_report


def test_a_separate_router_adds_its_code_and_serves_hop() -> None:
    text = format_report([], ([20.0, 21.0, 22.0], [15.0, 15.5, 16.0]), code_overhead=(9.0, 8.0))
    assert "added by HTTP + router: p50 5.50 ms" in text and "target ≤ 2 ms: MISSED" in text
    assert "router code (in-process, no Ray): p50 1.00 ms" in text
    assert "the rest is Serve's proxy → router hop" in text and "in-process (router.colocated)" not in text


def test_a_colocated_router_beats_the_handle_baseline() -> None:
    text = format_report([], ([11.0, 11.5, 12.0], [13.5, 14.0, 14.5]), code_overhead=(8.0, 6.8))
    assert "added by HTTP + router: p50 -2.50 ms" in text and "target ≤ 2 ms: met" in text
    assert "the router calls its engine in-process (router.colocated)" in text
    assert "the rest is" not in text  # no hop left to blame

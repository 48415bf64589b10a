"""ops/grafana: generated from code, parseable, templated, and reading only metrics we export."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import promql_parser

from maverick_serve.observability.catalogue import exported_series
from maverick_serve.observability.dashboards import DASHBOARDS, files
from ops_queries import OPS, dashboard_queries, read_names, recorded_names, selector_names


def test_committed_dashboards_are_what_the_code_builds() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "maverick_serve.observability.dashboards", str(OPS / "grafana"), "--check"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert sorted(files()) == sorted(p.name for p in (OPS / "grafana").glob("*.json"))


def test_check_mode_catches_a_hand_edited_dashboard(tmp_path) -> None:
    for name, text in files().items():
        (tmp_path / name).write_text(text)
    board = json.loads((tmp_path / "maverick-engine.json").read_text())
    board["panels"][0]["targets"][0]["expr"] = "vllm:gpu_cache_usage_perc"  # a removed vLLM name
    (tmp_path / "maverick-engine.json").write_text(json.dumps(board))
    r = subprocess.run(
        [sys.executable, "-m", "maverick_serve.observability.dashboards", str(tmp_path), "--check"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "maverick-engine.json" in r.stderr


def test_every_dashboard_is_templated() -> None:
    assert {d.uid for d in DASHBOARDS} == {
        "maverick-overview",
        "maverick-engine",
        "maverick-router-kvtier",
        "maverick-experts-prefill",
        "maverick-autoscaling",
    }
    for path in (OPS / "grafana").glob("*.json"):
        board = json.loads(path.read_text())
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource", path.name
        assert {"model", "deployment", "replica"} <= set(variables), path.name
        for panel in board["panels"]:
            assert panel["datasource"]["uid"] == "${datasource}", (path.name, panel["title"])
            for target in panel["targets"]:
                expr = target["expr"]
                # Rates over Grafana's interval, never a fixed window or a lifetime average.
                for window in re.findall(r"\[([^\]]+)\]", expr):
                    assert window == "$__rate_interval", (path.name, panel["title"], expr)


def test_every_query_parses_and_reads_exported_or_recorded_metrics() -> None:
    exported = set(exported_series())
    serve = {"ray_serve_deployment_replica_healthy"}  # Serve's own, checked live in tests/e2e
    queries = dashboard_queries()
    assert len(queries) > 60
    for q in queries:
        promql_parser.parse(q.expr)  # raises on a syntax error
    unknown = {n: w for n, w in read_names().items() if n not in exported | serve}
    assert not unknown, unknown
    assert "ray_maverick_engine_time_to_first_token_seconds_bucket" in read_names()
    assert recorded_names() >= {"vllm:num_requests_running", "maverick:slo_ttft_slow:ratio_rate1h"}


def test_a_removed_vllm_name_would_be_caught() -> None:
    names = selector_names('sum(vllm:gpu_cache_usage_perc{model_name=~"$model"})')
    assert names == {"vllm:gpu_cache_usage_perc"}
    assert not names <= recorded_names() | set(exported_series())

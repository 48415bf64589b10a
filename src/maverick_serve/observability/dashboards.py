"""The Grafana dashboards under ops/grafana, built here so every panel's query is code that tests
can parse (tests/unit/test_ops_dashboards.py) and the files stay in step with the catalogue.

    python -m maverick_serve.observability.dashboards ops/grafana          # write
    python -m maverick_serve.observability.dashboards ops/grafana --check  # compare (CI)

Every dashboard has a templated Prometheus datasource and `model`, `deployment` and `replica`
variables; rates use `$__rate_interval`; latency panels are quantiles of rate()d histograms, never
averages of lifetime sums.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RI = "$__rate_interval"
ENG = 'model_name=~"$model", replica=~"$replica"'
DS = {"type": "prometheus", "uid": "${datasource}"}


@dataclass
class Panel:
    title: str
    exprs: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"
    description: str = ""


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    panels: list[Panel] = field(default_factory=list)


def _q(quantile: float, metric: str, selector: str, by: str = "le") -> str:
    return f"histogram_quantile({quantile}, sum by ({by}) (rate({metric}_bucket{{{selector}}}[{RI}])))"


def _variables() -> list[dict[str, Any]]:
    def query(name: str, q: str, label: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DS,
            "query": {"query": q, "refId": name},
            "definition": q,
            "refresh": 2,
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "current": {"selected": True, "text": "All", "value": "$__all"},
        }

    return [
        {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"},
        query("model", "label_values(ray_maverick_engine_num_requests_running, model_name)", "Model"),
        query("deployment", "label_values(ray_serve_deployment_replica_healthy, deployment)", "Deployment"),
        query(
            "replica",
            'label_values(ray_maverick_engine_num_requests_running{model_name=~"$model"}, replica)',
            "Engine replica",
        ),
    ]


def _panel_json(panel: Panel, index: int) -> dict[str, Any]:
    width = 8 if panel.kind == "stat" else 12
    per_row = 24 // width
    return {
        "id": index + 1,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DS,
        "gridPos": {"x": (index % per_row) * width, "y": (index // per_row) * 8, "w": width, "h": 8},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom"}}
        if panel.kind == "timeseries"
        else {},
        "targets": [
            {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
            for i, (expr, legend) in enumerate(panel.exprs)
        ],
    }


def render(d: Dashboard) -> dict[str, Any]:
    return {
        "uid": d.uid,
        "title": d.title,
        "description": d.description,
        "tags": ["maverick-serve"],
        "schemaVersion": 39,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "templating": {"list": _variables()},
        "panels": [_panel_json(p, i) for i, p in enumerate(d.panels)],
    }


R = "ray_maverick_router_"
E = "ray_maverick_engine_"
K = "ray_maverick_kvtier_"

OVERVIEW = Dashboard(
    "maverick-overview",
    "maverick-serve / Overview and SLOs",
    "Answers, latency against the SLOs (99.9 % non-5xx, 99 % TTFT under 2.5 s), tokens and replicas.",
    [
        Panel("Availability (1h)", [("1 - maverick:slo_availability_errors:ratio_rate1h", "")], "percentunit",
              "stat"),
        Panel("TTFT under 2.5 s (1h)", [("1 - maverick:slo_ttft_slow:ratio_rate1h", "")], "percentunit",
              "stat"),
        Panel("Requests per second", [(f"sum(rate({R}requests_total[{RI}]))", "")], "reqps", "stat"),
        Panel("Answers by code", [(f"sum by (code) (rate({R}requests_total[{RI}]))", "{{code}}")], "reqps"),
        Panel("Error budget burn rate", [
            ("maverick:slo_availability_errors:ratio_rate5m / 0.001", "availability 5m"),
            ("maverick:slo_availability_errors:ratio_rate1h / 0.001", "availability 1h"),
            ("maverick:slo_ttft_slow:ratio_rate5m / 0.01", "TTFT 5m"),
            ("maverick:slo_ttft_slow:ratio_rate1h / 0.01", "TTFT 1h"),
        ], "short", description="1 = spending the budget as fast as the objective allows; 14.4 pages."),
        Panel("Router TTFT", [
            (_q(0.5, R + "time_to_first_token_seconds", ""), "p50"),
            (_q(0.95, R + "time_to_first_token_seconds", ""), "p95"),
        ], "s"),
        Panel("Request duration", [
            (_q(0.5, R + "request_duration_seconds", ""), "p50"),
            (_q(0.95, R + "request_duration_seconds", ""), "p95"),
        ], "s"),
        Panel("Tokens per second", [
            (f"sum(rate({E}prompt_tokens_total{{{ENG}}}[{RI}]))", "prompt"),
            (f"sum(rate({E}generation_tokens_total{{{ENG}}}[{RI}]))", "generated"),
        ], "short"),
        Panel("Healthy replicas by deployment", [
            ('sum by (deployment) (ray_serve_deployment_replica_healthy{deployment=~"$deployment"})',
             "{{deployment}}"),
        ], "short"),
    ],
)  # fmt: skip

ENGINE = Dashboard(
    "maverick-engine",
    "maverick-serve / Engine",
    "Engine replicas: batch and queue, KV cache, latency split (queue, prefill, decode), prefix cache.",
    [
        Panel("Requests running", [(f"sum by (replica) ({E}num_requests_running{{{ENG}}})", "{{replica}}")]),
        Panel("Requests waiting", [(f"sum by (replica) ({E}num_requests_waiting{{{ENG}}})", "{{replica}}")]),
        Panel("KV cache usage", [(f"max by (replica) ({E}kv_cache_usage_perc{{{ENG}}})", "{{replica}}")],
              "percentunit"),
        Panel("KV blocks used by layer group", [
            (f"sum by (group) ({E}kv_blocks_used{{{ENG}}})", "{{group}} used"),
            (f"sum by (group) ({E}kv_blocks_free{{{ENG}}})", "{{group}} free"),
        ]),
        Panel("Time to first token", [
            (_q(0.5, E + "time_to_first_token_seconds", ENG), "p50"),
            (_q(0.95, E + "time_to_first_token_seconds", ENG), "p95"),
            (_q(0.99, E + "time_to_first_token_seconds", ENG), "p99"),
        ], "s"),
        Panel("Inter-token latency", [
            (_q(0.5, E + "inter_token_latency_seconds", ENG), "p50"),
            (_q(0.95, E + "inter_token_latency_seconds", ENG), "p95"),
        ], "s"),
        Panel("Where request time goes (p95)", [
            (_q(0.95, E + "request_queue_time_seconds", ENG), "queue"),
            (_q(0.95, E + "request_prefill_time_seconds", ENG), "prefill"),
            (_q(0.95, E + "request_decode_time_seconds", ENG), "decode"),
            (_q(0.95, E + "e2e_request_latency_seconds", ENG), "end to end"),
        ], "s"),
        Panel("Prefix cache hit ratio", [(
            f"sum(rate({E}prefix_cache_hits_total{{{ENG}}}[{RI}])) / "
            f"sum(rate({E}prefix_cache_queries_total{{{ENG}}}[{RI}]))", "hit ratio")], "percentunit"),
        Panel("Throughput per replica", [
            (f"sum by (replica) ({E}prefill_tokens_per_second{{{ENG}}})", "{{replica}} prefill"),
            (f"sum by (replica) ({E}decode_tokens_per_second{{{ENG}}})", "{{replica}} decode"),
        ]),
        Panel("Finished requests by reason", [
            (f"sum by (finished_reason) (rate({E}request_success_total{{{ENG}}}[{RI}]))",
             "{{finished_reason}}"),
        ], "reqps"),
        Panel("Preemptions", [(f"sum by (replica) (rate({E}num_preemptions_total{{{ENG}}}[{RI}]))",
                               "{{replica}}")], "ops"),
    ],
)  # fmt: skip

ROUTER_KVTIER = Dashboard(
    "maverick-router-kvtier",
    "maverick-serve / Router and KV tier",
    "Routing decisions, refusals and retries; cache affinity (predicted vs found); the KV tier's traffic.",
    [
        Panel("Routing decisions by reason", [
            (f"sum by (policy, reason) (rate({R}decisions_total[{RI}]))", "{{policy}} {{reason}}")], "reqps"),
        Panel("Refusals by reason", [(f"sum by (reason) (rate({R}rejections_total[{RI}]))", "{{reason}}")],
              "reqps"),
        Panel("Retries before the first token", [(f"sum(rate({R}retries_total[{RI}]))", "retries")], "reqps"),
        Panel("Cached prompt tokens: predicted vs found", [
            (f"sum(rate({R}predicted_hit_tokens_total[{RI}])) / sum(rate({R}prompt_tokens_total[{RI}]))",
             "predicted"),
            (f"sum(rate({R}actual_hit_tokens_total[{RI}])) / sum(rate({R}prompt_tokens_total[{RI}]))",
             "found"),
        ], "percentunit"),
        Panel("Queue per engine replica (router's view)", [
            (f"max by (replica) ({R}replica_queue)", "{{replica}}")]),
        Panel("KV tier hit ratio", [(
            f"sum(rate({K}hit_tokens_total{{{ENG}}}[{RI}])) / "
            f"(sum(rate({K}hit_tokens_total{{{ENG}}}[{RI}])) + "
            f"sum(rate({K}miss_tokens_total{{{ENG}}}[{RI}])))", "hit ratio")], "percentunit"),
        Panel("KV tier bytes", [
            (f"sum(rate({K}bytes_in_total{{{ENG}}}[{RI}]))", "loaded"),
            (f"sum(rate({K}bytes_out_total{{{ENG}}}[{RI}]))", "stored"),
        ], "Bps"),
        Panel("KV tier time per second", [
            (f"sum(rate({K}load_seconds_total{{{ENG}}}[{RI}]))", "loading"),
            (f"sum(rate({K}store_seconds_total{{{ENG}}}[{RI}]))", "storing"),
        ], "percentunit", description="Seconds spent per second of wall time, summed over replicas."),
        Panel("KV tier problems", [
            (f"sum(rate({K}errors_total{{{ENG}}}[{RI}]))", "errors"),
            (f"sum(rate({K}checksum_failures_total{{{ENG}}}[{RI}]))", "checksum failures"),
            (f"sum(rate({K}dropped_stores_total{{{ENG}}}[{RI}]))", "stores dropped"),
            (f"sum(rate({K}blocks_stored_total{{{ENG}}}[{RI}]))", "blocks stored"),
            (f"sum(rate({K}breaker_skips_total{{{ENG}}}[{RI}]))", "lookups skipped (unhealthy)"),
        ], "ops"),
    ],
)  # fmt: skip

EXPERTS_PREFILL = Dashboard(
    "maverick-experts-prefill",
    "maverick-serve / Experts and prefill",
    "Expert-parallel load (imbalance, hot experts) and the prefill tier's hand-offs.",
    [
        Panel("Expert load imbalance (max/mean)", [
            (f"max by (replica) ({E}expert_imbalance_ratio{{{ENG}}})", "{{replica}}")]),
        Panel("Hottest experts (tokens in the load window)", [
            (f"topk(10, sum by (expert) ({E}expert_tokens{{{ENG}}}))", "expert {{expert}}")]),
        Panel("Prefill hand-offs by outcome", [
            (f"sum by (outcome) (rate({R}prefill_handoffs_total[{RI}]))", "{{outcome}}")], "reqps"),
        Panel("Prefill hand-off time", [
            (_q(0.5, R + "prefill_handoff_seconds", ""), "p50"),
            (_q(0.95, R + "prefill_handoff_seconds", ""), "p95"),
        ], "s"),
        Panel("Prefill replicas", [
            ('sum(ray_serve_deployment_replica_healthy{deployment="LlamaPrefill"})', "healthy")]),
    ],
)  # fmt: skip

AUTOSCALING = Dashboard(
    "maverick-autoscaling",
    "maverick-serve / Autoscaling",
    "What each tier's policy asks for, the load it saw, and why it decided.",
    [
        Panel("Desired replicas per tier", [
            ("max by (tier) (ray_maverick_autoscaler_desired_replicas)", "{{tier}} desired"),
            ('sum by (deployment) (ray_serve_deployment_replica_healthy{deployment=~"$deployment"})',
             "{{deployment}} running"),
        ]),
        Panel("Load seen per tier", [
            ("max by (tier) (ray_maverick_autoscaler_load)", "{{tier}} load"),
            ("max by (tier) (ray_maverick_autoscaler_target_per_replica)", "{{tier}} target per replica"),
        ]),
        Panel("Decisions by reason", [
            (f"sum by (tier, reason) (rate(ray_maverick_autoscaler_decisions_total[{RI}]))",
             "{{tier}} {{reason}}"),
        ], "ops"),
        Panel("Requests waiting (engine signal)", [
            (f"sum({E}num_requests_waiting{{{ENG}}})", "waiting"),
            (f"avg({E}kv_cache_usage_perc{{{ENG}}})", "KV usage (mean)"),
        ]),
    ],
)  # fmt: skip

DASHBOARDS = (OVERVIEW, ENGINE, ROUTER_KVTIER, EXPERTS_PREFILL, AUTOSCALING)


def files() -> dict[str, str]:
    return {f"{d.uid}.json": json.dumps(render(d), indent=2, ensure_ascii=False) + "\n" for d in DASHBOARDS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder of the dashboard JSON files (ops/grafana)")
    parser.add_argument("--check", action="store_true", help="fail when a file differs; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for name, text in files().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
    if stale:
        print(
            f"dashboards differ from the code: {', '.join(stale)}; run "
            f"python -m maverick_serve.observability.dashboards {args.out}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

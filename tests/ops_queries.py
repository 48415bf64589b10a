"""Every PromQL query in ops/ (dashboards and rules), parsed with promql-parser, and the metric
names their selectors read — shared by the unit tests (against the catalogue) and the e2e test
(against a live scrape)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import promql_parser
import yaml

OPS = Path(__file__).resolve().parents[1] / "ops"
GRAFANA_MACROS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


@dataclass(frozen=True)
class Query:
    where: str  # file and panel/rule
    expr: str


def _grafana_to_promql(expr: str) -> str:
    for macro, value in GRAFANA_MACROS.items():
        expr = expr.replace(macro, value)
    return expr


def dashboard_queries() -> list[Query]:
    out = []
    for path in sorted((OPS / "grafana").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                out.append(Query(f"{path.name}: {panel['title']}", _grafana_to_promql(target["expr"])))
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                inner = re.fullmatch(r"label_values\((.*), *\w+\)", var["definition"])
                assert inner, var["definition"]
                out.append(Query(f"{path.name}: variable {var['name']}", inner.group(1)))
    return out


def rule_groups() -> list[dict]:
    groups = []
    for path in sorted((OPS / "prometheus").glob("*.rules.yaml")):
        groups += yaml.safe_load(path.read_text())["groups"]
    return groups


def rule_queries() -> list[Query]:
    return [
        Query(f"rule {r.get('alert') or r.get('record')}", r["expr"])
        for g in rule_groups()
        for r in g["rules"]
    ]


def recorded_names() -> set[str]:
    return {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}


def selector_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: object) -> bool:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def read_names() -> dict[str, list[str]]:
    """Metric name → where it is read, for every selector in ops/ that no rule records."""
    recorded = recorded_names()
    out: dict[str, list[str]] = {}
    for q in dashboard_queries() + rule_queries():
        for name in selector_names(q.expr) - recorded:
            out.setdefault(name, []).append(q.where)
    return out

"""ops/prometheus: rules pass promtool, every alert fires in one case and stays quiet in another,
every alert has one runbook with the four sections, and the vLLM names cover the catalogue."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from maverick_serve.observability.catalogue import CATALOGUE
from ops_queries import OPS, rule_groups

PROM = OPS / "prometheus"
RUNBOOKS = OPS / "runbooks"
SECTIONS = ["Meaning", "Impact", "Diagnosis", "Mitigation"]


def _promtool() -> str:
    local = Path(__file__).resolve().parents[2] / ".cache/tools/bin/promtool"
    found = str(local) if local.exists() else shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing in CI: scripts/setup.sh runs scripts/setup-prometheus.sh")
        pytest.skip("promtool is not installed (bash scripts/setup-prometheus.sh)")
    return found


def _run(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *args], capture_output=True, text=True, cwd=cwd)


def _alerts() -> dict[str, dict]:
    return {r["alert"]: r for g in rule_groups() for r in g["rules"] if "alert" in r}


def test_rules_pass_promtool_check() -> None:
    files = sorted(p.name for p in PROM.glob("*.rules.yaml"))
    assert files == ["alerts.rules.yaml", "slo.rules.yaml", "vllm-compat.rules.yaml"]
    r = _run("check", "rules", *files)
    assert r.returncode == 0, r.stdout + r.stderr


def test_alert_and_recording_rule_tests_pass() -> None:
    r = _run("test", "rules", "tests/alerts.test.yaml", "tests/vllm-compat.test.yaml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("SUCCESS") == 2


def test_every_alert_has_a_case_that_fires_and_one_that_stays_quiet() -> None:
    doc = yaml.safe_load((PROM / "tests/alerts.test.yaml").read_text())
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fires == set(_alerts()) == quiet


def test_promtool_fails_a_case_whose_expectation_is_wrong(tmp_path: Path) -> None:
    """The rule tests can fail: a quiet case expected to fire is reported as a failure."""
    doc = yaml.safe_load((PROM / "tests/alerts.test.yaml").read_text())
    case = next(c for c in doc["tests"] if c["name"] == "MaverickPreemptions stays quiet")
    fired = next(c for c in doc["tests"] if c["name"] == "MaverickPreemptions fires")
    case["alert_rule_test"][0]["exp_alerts"] = fired["alert_rule_test"][0]["exp_alerts"]
    doc["tests"] = [case]
    doc["rule_files"] = [str(PROM / "slo.rules.yaml"), str(PROM / "alerts.rules.yaml")]
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(doc))
    r = _run("test", "rules", "t.yaml", cwd=tmp_path)
    assert r.returncode != 0 and "FAILED" in r.stdout + r.stderr


def test_promtool_refuses_a_broken_rule(tmp_path: Path) -> None:
    bad = {"groups": [{"name": "x", "rules": [{"alert": "X", "expr": "sum(rate(foo[5m])"}]}]}
    (tmp_path / "bad.rules.yaml").write_text(yaml.safe_dump(bad))
    assert _run("check", "rules", "bad.rules.yaml", cwd=tmp_path).returncode != 0


def test_every_alert_has_severity_text_and_exactly_one_runbook() -> None:
    alerts = _alerts()
    assert len(alerts) >= 14
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"page", "ticket", "info"}, name
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], name
        assert notes["runbook_url"].endswith(f"/ops/runbooks/{name}.md"), name
        text = (RUNBOOKS / f"{name}.md").read_text()
        headings = re.findall(r"^## (.+)$", text, flags=re.M)
        assert headings == SECTIONS, (name, headings)
        assert rule["expr"] in text, f"{name}'s runbook quotes an old rule"
    assert {p.stem for p in RUNBOOKS.glob("*.md")} == set(alerts)


def test_vllm_recording_rules_cover_every_vllm_name_in_the_catalogue() -> None:
    recorded = {r["record"]: r["expr"] for g in rule_groups() for r in g["rules"] if "record" in r}
    for spec in CATALOGUE:
        if spec.vllm is None:
            continue
        if spec.kind == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                assert recorded[spec.vllm + suffix] == spec.exported_name + suffix
        else:
            assert recorded[spec.vllm] == spec.exported_name, spec.name
    # The names vLLM removed (and other dashboards still query) are not invented here.
    assert not {"vllm:gpu_cache_usage_perc", "vllm:time_per_output_token_seconds"} & set(recorded)

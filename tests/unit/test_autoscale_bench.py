"""`bench autoscale`'s figures and Serve configs, on synthetic samples (the run itself needs Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from maverick_serve.bench.autoscale_bench import (
    RequestRecord,
    VariantResult,
    format_table,
    variant_config,
    write_plot,
)
from maverick_serve.cli import main
from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.serving.builder import ENGINE_DEPLOYMENT


def _result(name: str) -> VariantResult:
    # t, in flight, engines running, routers, engines asked for
    samples = [
        (0.0, 0, 1, 1, 1),
        (10.0, 8, 1, 1, 3),
        (20.0, 8, 3, 1, 3),
        (30.0, 1, 3, 1, 3),
        (40.0, 0, 1, 1, 1),
    ]
    records = [
        RequestRecord(1.0, 0.5, True),
        RequestRecord(12.0, 2.0, True),
        RequestRecord(13.0, None, False, 429),
    ]
    return VariantResult(name, records, samples, trace_s=40.0, first_burst_s=5.0, min_replicas=1)


def test_figures_from_samples() -> None:
    r = _result("maverick")
    assert r.replica_seconds() == 10 * 1 + 10 * 1 + 10 * 3 + 10 * 3  # left-step integral to trace end
    assert (r.time_to_scale_up(4), r.time_to_scale_up(2)) == (5.0, 15.0)  # asked at 10 s, running at 20 s
    assert r.attainment(1.0) == pytest.approx(1 / 3) and r.failures_by_status() == "1×429"
    table = format_table([_result("fixed-max"), r], 1.0)
    assert "| maverick | 33.3% | 80 | 1.00× | 5.0 s / 15.0 s |" in table
    assert "| fixed-max | 33.3% | 80 | 1.00× | — / — |" in table


def test_write_plot(tmp_path: Path) -> None:
    path = write_plot([_result("fixed-min"), _result("maverick")], tmp_path / "plot.png", 3)
    with Image.open(path) as img:
        assert img.size == (900, 2 * 170 + 20)


def test_variants_differ_only_in_how_engines_are_sized() -> None:
    base = ClusterConfig.model_validate({"model": {"path": "/m"}, "resources": {"check_cluster_fit": False}})
    fixed, body = variant_config(base, "fixed-max", 1, 3)
    assert fixed.resources.engine.replicas == 3 and not fixed.autoscaling.enabled
    assert "autoscaling_policy" not in body["applications"][0]
    ours, body = variant_config(base, "maverick", 1, 3)
    assert ours.autoscaling.enabled and ours.autoscaling.engine.max_replicas == 3
    assert body["applications"][0]["autoscaling_policy"]["policy_function"].endswith(":ClusterAutoscaler")
    _, body = variant_config(base, "serve-default", 1, 3)
    app = body["applications"][0]
    assert "autoscaling_policy" not in app
    (override,) = app["deployments"]
    assert override["name"] == ENGINE_DEPLOYMENT and "policy" not in override["autoscaling_config"]
    assert not ours.autoscaling.engine.learn_capacity.enabled
    learned, body = variant_config(base, "maverick-learned", 1, 3, slo_ttft_s=0.8)
    engine = learned.autoscaling.engine
    assert engine.learn_capacity.enabled and engine.slo_ttft_p95_s == 0.8
    assert engine.learn_capacity.interval_s == 2 * learned.autoscaling.signal_window_s
    kwargs = body["applications"][0]["autoscaling_policy"]["policy_kwargs"]
    assert kwargs["cluster"]["autoscaling"]["engine"]["learn_capacity"]["enabled"] is True


def test_bad_cli_input_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "autoscale", "--min-replicas", "4", "--max-replicas", "2"]) != 0
    assert "--min-replicas (4) exceeds --max-replicas (2)" in capsys.readouterr().err
    assert main(["bench", "autoscale", "--variants", "magic"]) != 0
    assert "--variants: unknown magic" in capsys.readouterr().err

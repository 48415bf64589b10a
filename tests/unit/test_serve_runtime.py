"""serve_runtime: the variables each choice sets, and the router counts direct ingress refuses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.config.serve_runtime import ServeRuntimeConfig


def test_default_is_the_proxy_with_serves_fast_replica_path() -> None:
    env = ServeRuntimeConfig().environment(8000)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert env["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "1"
    assert env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    assert env["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] == "0"
    # Serve's umbrella switch would also turn direct ingress on and Serve's stderr logs off.
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
    assert ServeRuntimeConfig().proxy_port(8000, 41234) == 8000


def test_every_choice_sets_every_variable_so_a_later_run_undoes_an_earlier_one() -> None:
    choices = [
        ServeRuntimeConfig(ingress=i, throughput_optimized=f)
        for i in ("proxy", "direct", "haproxy")
        for f in (True, False)
    ]
    keys = {frozenset(c.environment(8000)) for c in choices}
    assert len(keys) == 1
    plain = ServeRuntimeConfig(throughput_optimized=False).environment(8000)
    assert plain["RAY_SERVE_USE_GRPC_BY_DEFAULT"] == "0"
    assert plain["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "1"


def test_direct_gives_the_router_http_port_and_moves_serves_proxy_aside() -> None:
    d = ServeRuntimeConfig(ingress="direct")
    env = d.environment(8011)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # Serve hands out ports from [min, max): exactly http.port.
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == (
        "8011",
        "8012",
    )
    assert env["RAY_SERVE_PORT_QUARANTINE_S"] == "0"  # a replaced router takes the port back at once
    assert d.proxy_port(8011, 41234) == 41234
    h = ServeRuntimeConfig(ingress="haproxy").environment(8011)
    assert (h["RAY_SERVE_ENABLE_HA_PROXY"], h["RAY_SERVE_ENABLE_DIRECT_INGRESS"]) == ("1", "1")
    assert h["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "30000"
    assert ServeRuntimeConfig(ingress="haproxy").proxy_port(8011, 41234) == 8011


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"resources": {"router": {"replicas": 2}}}, "resources.router.replicas is 2"),
        (
            {"autoscaling": {"enabled": True, "router": {"min_replicas": 1, "max_replicas": 3}}},
            "autoscaling.router.max_replicas is 3",
        ),
    ],
)
def test_direct_ingress_with_more_than_one_router_is_refused_naming_the_field(
    data: dict[str, object], field: str
) -> None:
    with pytest.raises(ValidationError, match=field) as err:
        ClusterConfig.model_validate({**data, "serve_runtime": {"ingress": "direct"}})
    assert "ingress: haproxy" in str(err.value)
    ClusterConfig.model_validate({**data, "serve_runtime": {"ingress": "haproxy"}})  # balances routers


@pytest.mark.parametrize(
    "bad",
    [{"ingress": "nginx"}, {"direct_ingress_draining_s": -1}, {"throughput": True}],
)
def test_bad_serve_runtime_values_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match="serve_runtime"):
        ClusterConfig.model_validate({"serve_runtime": bad})

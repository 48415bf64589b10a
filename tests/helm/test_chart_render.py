"""The chart renders, validates against the real schemas, matches its golden files and the code."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_helpers import EXAMPLES, NAMESPACE, RELEASE, ROOT, helm_template, render_docs

from maverick_serve.config.cluster import ClusterConfig
from maverick_serve.config.helm_values import HelmValues
from maverick_serve.config.observability import TracingConfig
from maverick_serve.config.serve_runtime import ServeRuntimeConfig
from maverick_serve.kube.chart import CHART_DIR
from maverick_serve.kube.check import check_values
from maverick_serve.kube.values_docs import schema_text, values_table
from maverick_serve.serving.builder import ENGINE_DEPLOYMENT, ROUTER_DEPLOYMENT, deployment_options
from ops_queries import OPS, rule_groups

CRDS = ROOT.parent / "shared" / "crds"
GOLDEN = Path(__file__).parent / "golden"
BAD = Path(__file__).parent / "bad"
# The Kubernetes versions we state support for (Chart.yaml kubeVersion >= 1.29).
KUBE_VERSIONS = ("1.33.0", "1.35.0")
CORE_GROUPS = ("v1", "apps/v1", "policy/v1", "networking.k8s.io/v1")


def _strict(schema: Any) -> Any:
    """The CRD schema with unknown fields refused, as the API server's strict field validation does."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


@pytest.fixture(scope="module")
def rendered(helm: str) -> dict[str, list[dict[str, Any]]]:
    return {p.stem: render_docs(helm, p) for p in EXAMPLES}


def test_helm_lint_strict(helm: str) -> None:
    run = subprocess.run([helm, "lint", "--strict", str(CHART_DIR)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 chart(s) failed" in run.stdout


def test_every_example_is_there_and_renders(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert set(rendered) == {"tiny-cpu", "maverick-fp8-8xh100", "maverick-ep-2x8xh100", "scout-10m-8xh200"}
    for name, docs in rendered.items():
        kinds = [d["kind"] for d in docs]
        assert kinds.count("RayService") == 1, name
        assert {"ServiceAccount", "NetworkPolicy", "PodDisruptionBudget"} <= set(kinds), name


@pytest.mark.parametrize("example", [p.stem for p in EXAMPLES])
def test_rendered_objects_validate_against_their_schemas(
    rendered: dict[str, list[dict[str, Any]]], example: str
) -> None:
    ray = {k: crd_validator(k) for k in ("RayService", "RayCluster")}
    checked = set()
    for doc in rendered[example]:
        kind, api = doc["kind"], doc["apiVersion"]
        if api in CORE_GROUPS:
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)
        elif api == "ray.io/v1":
            errors = [f"{'/'.join(map(str, e.path))}: {e.message}" for e in ray[kind].iter_errors(doc)]
            assert errors == [], f"{kind} does not match the KubeRay CRD: {errors[:5]}"
        else:
            _check_uncatalogued(doc)
        checked.add(kind)
    assert "RayService" in checked


def _check_uncatalogued(doc: dict[str, Any]) -> None:
    """Gateway API and Prometheus-operator objects: their CRDs are not vendored (see README)."""
    spec = doc["spec"]
    if doc["kind"] == "HTTPRoute":
        assert doc["apiVersion"] == "gateway.networking.k8s.io/v1"
        assert spec["parentRefs"] and all("name" in p for p in spec["parentRefs"])
        (rule,) = spec["rules"]
        assert rule["backendRefs"] == [{"name": f"{RELEASE}-maverick-serve-serve", "port": 8000}]
        assert re.fullmatch(r"[0-9]+(ms|s|m|h)", rule["timeouts"]["request"])
    elif doc["kind"] == "PodMonitor":
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert spec["podMetricsEndpoints"][0]["port"] == "metrics"
        assert spec["selector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
    elif doc["kind"] == "PrometheusRule":
        # The chart's rules are ops/prometheus's rule files, group for group.
        assert doc["apiVersion"] == "monitoring.coreos.com/v1"
        assert spec["groups"] == rule_groups()
        assert {r["alert"] for g in spec["groups"] for r in g["rules"] if "alert" in r} >= {
            "MaverickAvailabilityBurnRateFast",
            "MaverickEngineMetricsAbsent",
        }
    else:
        raise AssertionError(f"no check for {doc['apiVersion']} {doc['kind']}")


def _masked(text: str) -> str:
    """The generated Redis password is random per render: golden files hold a placeholder."""
    return re.sub(r"(\n  redis-password: )\S+", r"\1<generated>", text)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_golden_renders(helm: str, example: Path) -> None:
    run = helm_template(helm, example)
    assert run.returncode == 0, run.stderr
    golden = GOLDEN / f"{example.stem}.yaml"
    got = _masked(run.stdout)
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(got)
    assert golden.exists(), f"no golden file for {example.name}: run with UPDATE_GOLDEN=1"
    assert got == golden.read_text(), (
        f"the render of {example.name} changed; if on purpose, regenerate: "
        "UPDATE_GOLDEN=1 bash scripts/test.sh tests/helm"
    )


def test_values_schema_and_defaults_are_the_code() -> None:
    assert (CHART_DIR / "values.schema.json").read_text() == schema_text(), (
        "values.schema.json drifted from HelmValues: maverick-serve config schema --helm "
        "-o helm/maverick-serve/values.schema.json"
    )
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert HelmValues.model_validate(values) == HelmValues(), "values.yaml differs from HelmValues' defaults"
    readme = (CHART_DIR / "README.md").read_text()
    assert values_table() in readme, (
        "the chart README's values table is stale: maverick-serve config helm-readme"
    )


def test_rendered_app_is_the_cluster_config_with_what_the_chart_owns(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    for name, docs in rendered.items():
        (svc,) = [d for d in docs if d["kind"] == "RayService"]
        serve = yaml.safe_load(svc["spec"]["serveConfigV2"])
        (app,) = serve["applications"]
        assert app["import_path"] == "maverick_serve.serving.builder:app_builder"
        cluster = ClusterConfig.model_validate(app["args"])  # the code accepts what the chart renders
        example = yaml.safe_load((CHART_DIR / "examples" / f"{name}.yaml").read_text())["cluster"]
        for key in ("engine", "experts"):  # what the user wrote survives the chart's merge
            for field, value in example.get(key, {}).items():
                if not isinstance(value, dict):
                    assert getattr(getattr(cluster, key), field) == value, (name, key, field)
        assert cluster.http.host == "0.0.0.0"
        assert cluster.resources.engine.custom_resources == {"maverick-engine": 1}
        assert cluster.resources.check_cluster_fit is False
        if cluster.kvtier.store.type == "redis":
            assert cluster.kvtier.store.password_env == "MAVERICK_REDIS_PASSWORD"
            assert "@" not in cluster.kvtier.store.url


def _groups(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    (svc,) = [d for d in docs if d["kind"] == "RayService"]
    return {g["groupName"]: g for g in svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def test_worker_groups_are_sized_from_the_config(rendered: dict[str, list[dict[str, Any]]]) -> None:
    ep = _groups(rendered["maverick-ep-2x8xh100"])
    assert set(ep) == {"router", "engine", "experts"}
    assert ep["experts"]["replicas"] == 2  # 15 workers x 1 GPU over 8-GPU pods
    container = ep["experts"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert ep["engine"]["replicas"] == 1
    assert json.loads(json.loads(ep["engine"]["rayStartParams"]["resources"])) == {"maverick-engine": 1000}
    scout = _groups(rendered["scout-10m-8xh200"])
    assert set(scout) == {"router", "engine", "prefill"} and scout["prefill"]["replicas"] == 1
    tiny = _groups(rendered["tiny-cpu"])
    assert tiny["engine"]["replicas"] == 1  # 2 replicas x 1 CPU in 2-CPU pods
    assert "nvidia.com/gpu" not in tiny["engine"]["template"]["spec"]["containers"][0]["resources"]["limits"]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("unknown-key", "at '/cluster/experts': additional properties 'ep_degre' not allowed"),
        ("wrong-type", "at '/cluster/resources/engine/replicas': got string, want integer"),
        ("gpus-per-replica", "cluster.resources.engine.num_gpus=16: one engine replica needs more GPUs"),
        ("disaggregation-without-redis", "cluster.disaggregation.enabled hands KV"),
        ("password-in-url", "cluster.kvtier.store.url must not carry credentials"),
        ("too-many-pods", "above ray.workerGroups.engine.maxReplicas=4"),
    ],
)
def test_bad_values_fail_helm_template_naming_the_key(helm: str, bad: str, message: str) -> None:
    run = helm_template(helm, BAD / f"{bad}.yaml")
    assert run.returncode != 0
    assert message in run.stderr, run.stderr


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("ep-above-experts", "cluster.experts.ep_degree=16 exceeds the 8 routed experts per layer"),
        ("unknown-key", "cluster.experts.ep_degre: Extra inputs are not permitted"),
        ("gpus-per-replica", "cluster.resources.engine.num_gpus=16"),
    ],
)
def test_bad_values_fail_config_check_naming_the_key(helm: str, bad: str, message: str) -> None:
    with pytest.raises(Exception, match=re.escape(message)):
        check_values([BAD / f"{bad}.yaml"])


def test_config_check_prints_the_memory_plan(helm: str) -> None:
    report = check_values([CHART_DIR / "examples" / "maverick-ep-2x8xh100.yaml"], model_preset="maverick")
    rows = {r.tier: r for r in report.rows}
    assert rows["experts"].count == 15 and rows["experts"].gpus_each == 1
    assert 40 < rows["experts"].weights_gib < 60  # 128 experts x 24 layers x 3 x 5120 x 8192 bf16 / 15
    assert report.fits and "per-GPU memory plan" in "\n".join(report.lines())


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key in ("containers", "initContainers"):
                out.extend(node.get(key) or [])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return out


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_no_secret_value_in_args_env_or_config(helm: str, example: Path) -> None:
    docs = render_docs(helm, example, sets=("redis.bundled.auth.existingSecret=",))
    secrets = [d for d in docs if d["kind"] == "Secret"]
    known = {base64.b64decode(v).decode() for s in secrets for v in s.get("data", {}).values()}
    known |= {"hunter2-hub-token", "sk-test-api-key"}
    others = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    for value in known:
        assert value not in others
    for doc in docs:
        for c in _containers(doc):
            for env in c.get("env") or []:
                if re.search(r"PASSWORD|TOKEN|SECRET|API_KEY", env["name"]):
                    assert "value" not in env and "secretKeyRef" in env["valueFrom"], (c["name"], env)
            assert not re.search(r"requirepass \S+[^\"]$", " ".join(c.get("args") or [])), c["name"]


def test_dashboards_and_rules_come_from_ops(helm: str) -> None:
    """With monitoring on, one ConfigMap per ops/grafana dashboard and one PrometheusRule holding
    every group of ops/prometheus/*.rules.yaml; with it off, neither."""
    cmd = [helm, "template", RELEASE, str(CHART_DIR), "-n", NAMESPACE]
    on = ["--set", "monitoring.dashboards.enabled=true", "--set", "monitoring.prometheusRule.enabled=true"]
    docs = [
        d for d in yaml.safe_load_all(subprocess.run(cmd + on, capture_output=True, text=True).stdout) if d
    ]
    maps = {k: v for d in docs if d["kind"] == "ConfigMap" for k, v in d["data"].items()}
    boards = {p.name: p.read_text() for p in (OPS / "grafana").glob("*.json")}
    assert len(boards) == 5 and {k: json.loads(v) for k, v in maps.items()} == {
        k: json.loads(v) for k, v in boards.items()
    }
    for d in docs:
        if d["kind"] == "ConfigMap":
            assert d["metadata"]["labels"]["grafana_dashboard"] == "1"
    (pr,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert pr["spec"]["groups"] == rule_groups()
    plain = [d for d in yaml.safe_load_all(subprocess.run(cmd, capture_output=True, text=True).stdout) if d]
    assert not [d for d in plain if d["kind"] in ("ConfigMap", "PrometheusRule")]


def test_tracing_env_on_every_ray_container_matches_the_config(helm: str, tmp_path: Path) -> None:
    """The chart turns tracing on in each pod exactly as `maverick-serve up` does locally."""
    tracing = {"enabled": True, "endpoint": "http://otel-collector.monitoring:4318", "sampling_ratio": 0.0}
    values = tmp_path / "tracing.yaml"
    values.write_text(yaml.safe_dump({"cluster": {"observability": {"tracing": tracing}}}))
    docs = render_docs(helm, ROOT / "helm/maverick-serve/examples/tiny-cpu.yaml", values)
    want = TracingConfig.model_validate(tracing).resolve({}).environment()
    assert want["RAY_SERVE_TRACING_SAMPLING_RATIO"] == "0.0"  # 0 is a ratio, not "unset"
    (svc,) = [d for d in docs if d["kind"] == "RayService"]
    spec = svc["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c["env"]}
            got = {k: env.get(k) for k in want}
            assert {k: _num(v) for k, v in got.items()} == {k: _num(v) for k, v in want.items()}, c["name"]
    plain = render_docs(helm, ROOT / "helm/maverick-serve/examples/tiny-cpu.yaml")
    assert "RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH" not in json.dumps(plain)


@pytest.mark.parametrize(
    "serve_runtime",
    [
        {},
        {"ingress": "direct", "throughput_optimized": False},
        {"ingress": "haproxy", "direct_ingress_draining_s": 7.5},
    ],
)
def test_serve_runtime_env_on_every_ray_container_matches_the_config(
    helm: str, tmp_path: Path, serve_runtime: dict[str, Any]
) -> None:
    """Serve's data-plane switches reach every Ray process as `maverick-serve up` sets them."""
    values = tmp_path / "serve-runtime.yaml"
    values.write_text(yaml.safe_dump({"cluster": {"serve_runtime": serve_runtime}}))
    docs = render_docs(helm, ROOT / "helm/maverick-serve/examples/tiny-cpu.yaml", values)
    (svc,) = [d for d in docs if d["kind"] == "RayService"]
    port = yaml.safe_load(svc["spec"]["serveConfigV2"])["http_options"]["port"]
    want = ServeRuntimeConfig.model_validate(serve_runtime).environment(port)
    assert want["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == ("0" if not serve_runtime else "1")
    spec = svc["spec"]["rayClusterConfig"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        for c in pod["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert {k: env.get(k) for k in want} == want, c["name"]


def test_colocated_router_renders_one_ingress_deployment_sized_as_engines(helm: str, tmp_path: Path) -> None:
    """`cluster.router.colocated` reaches the app's args; what Serve builds from them has no Router
    deployment, and the app policy the chart renders sizes the engines (router tier unused)."""
    values = tmp_path / "colocated.yaml"
    cluster_values = {"router": {"colocated": True}, "autoscaling": {"enabled": True}}
    values.write_text(yaml.safe_dump({"cluster": cluster_values}))
    docs = render_docs(helm, ROOT / "helm/maverick-serve/examples/tiny-cpu.yaml", values)
    (svc,) = [d for d in docs if d["kind"] == "RayService"]
    (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
    cluster = ClusterConfig.model_validate(app["args"])
    assert cluster.router.colocated and cluster.scaled_tiers() == ["engine"]
    options = deployment_options(cluster)
    assert ROUTER_DEPLOYMENT not in options and "autoscaling_config" in options[ENGINE_DEPLOYMENT]
    policy = app["autoscaling_policy"]["policy_kwargs"]
    assert ClusterConfig.model_validate(policy["cluster"]).router.colocated


def _num(v: str | None) -> object:
    try:
        return float(v) if v is not None else None
    except ValueError:
        return v


def test_security_defaults(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["maverick-ep-2x8xh100"]
    for doc in docs:
        for c in _containers(doc):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    (svc,) = [d for d in docs if d["kind"] == "RayService"]
    spec = svc["spec"]
    assert spec["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]
    assert head["spec"]["securityContext"]["runAsNonRoot"] is True
    assert any(a.startswith("checksum/") for a in head["metadata"]["annotations"])
    mounts = {m["mountPath"] for m in head["spec"]["containers"][0]["volumeMounts"]}
    assert {"/tmp/ray", "/dev/shm", "/models", "/etc/maverick/api-keys"} <= mounts
    assert spec["upgradeStrategy"]["type"] == "NewClusterWithIncrementalUpgrade"
    assert spec["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]
    pdbs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert pdbs[f"{RELEASE}-maverick-serve-head"]["spec"]["maxUnavailable"] == 0
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    ray_policy = next(p for p in policies if p["metadata"]["name"].endswith("-ray"))
    ports = [sorted(p["port"] for p in rule.get("ports", [])) for rule in ray_policy["spec"]["ingress"]]
    assert [8000] in ports and [8000, 8265, 52365] in ports  # gateway; operator
    assert copy.deepcopy(ray_policy)["spec"]["policyTypes"] == ["Ingress"]


def test_extra_objects_and_common_labels(helm: str, tmp_path: Path) -> None:
    values = tmp_path / "extra.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "commonLabels": {"team": "inference"},
                "extraObjects": [
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "metadata": {"name": "{{ .Release.Name }}-extra"},
                    },
                    "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-extra-text\n",
                ],
            }
        )
    )
    docs = render_docs(helm, values)
    names = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    assert names == {f"{RELEASE}-extra", f"{RELEASE}-extra-text"}
    labelled = [d for d in docs if d["kind"] not in ("ConfigMap",)]
    assert labelled and all(d["metadata"]["labels"]["team"] == "inference" for d in labelled)


def test_config_check_cli_exit_codes(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "maverick_serve.cli", "config", "check"]
    ok = subprocess.run(
        [*cli, "-f", str(CHART_DIR / "examples" / "tiny-cpu.yaml")], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert "per-GPU memory plan" in ok.stdout and "engine" in ok.stdout
    bad = subprocess.run([*cli, "-f", str(BAD / "ep-above-experts.yaml")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "cluster.experts.ep_degree=16 exceeds the 8 routed experts per layer" in bad.stderr


def test_weights_download_is_pinned_and_workers_wait_for_it(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    (svc,) = [d for d in rendered["maverick-fp8-8xh100"] if d["kind"] == "RayService"]
    cluster = svc["spec"]["rayClusterConfig"]
    (download,) = cluster["headGroupSpec"]["template"]["spec"]["initContainers"]
    env = {e["name"]: e for e in download["env"]}
    assert re.fullmatch(r"[0-9a-f]{40}", env["MODEL_REVISION"]["value"])
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    for group in cluster["workerGroupSpecs"]:
        (wait,) = group["template"]["spec"]["initContainers"]
        assert wait["name"] == "wait-for-weights"
        assert {e["name"]: e["value"] for e in wait["env"]}["MODEL_REVISION"] == env["MODEL_REVISION"][
            "value"
        ]

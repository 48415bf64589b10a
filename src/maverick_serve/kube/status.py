"""`maverick-serve status --kube`: a RayService's state read through the official Kubernetes client.

Conditions, the active and pending clusters, each Serve application's and deployment's status, and
each worker group's ready vs desired pods (from the RayCluster spec and its pods' Ready condition).
"""

from __future__ import annotations

from typing import Any

from maverick_serve.cli_common import CLIError

GROUP, VERSION = "ray.io", "v1"


def _apis(context: str | None, client_config: Any = None) -> tuple[Any, Any]:
    from kubernetes import client, config

    if client_config is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            try:
                config.load_kube_config(context=context)
            except (config.ConfigException, OSError) as exc:
                raise CLIError(f"no Kubernetes configuration (in-cluster or kubeconfig): {exc}") from exc
        api = client.ApiClient()
    else:
        api = client.ApiClient(client_config)
    return client.CustomObjectsApi(api), client.CoreV1Api(api)


def _ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))


def collect(
    namespace: str, name: str, context: str | None = None, client_config: Any = None
) -> dict[str, Any]:
    from kubernetes.client.exceptions import ApiException

    custom, core = _apis(context, client_config)
    try:
        svc = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "rayservices", name)
    except ApiException as exc:
        if exc.status == 404:
            raise CLIError(f"no RayService {name} in namespace {namespace}") from exc
        raise CLIError(f"reading RayService {namespace}/{name} failed: {exc.status} {exc.reason}") from exc
    status = svc.get("status") or {}
    out: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "service_status": status.get("serviceStatus", ""),
        "endpoints": status.get("numServeEndpoints", 0),
        "conditions": [
            {k: c.get(k, "") for k in ("type", "status", "reason", "message")}
            for c in status.get("conditions", [])
        ],
        "clusters": {},
    }
    for role in ("activeServiceStatus", "pendingServiceStatus"):
        s = status.get(role) or {}
        cluster = s.get("rayClusterName")
        if not cluster:
            continue
        apps = {
            app: {
                "status": a.get("status", ""),
                "message": a.get("message", ""),
                "deployments": {
                    d: {"status": v.get("status", ""), "message": v.get("message", "")}
                    for d, v in (a.get("serveDeploymentStatuses") or {}).items()
                },
            }
            for app, a in (s.get("applicationStatuses") or {}).items()
        }
        groups = {}
        try:
            rc = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "rayclusters", cluster)
            specs = rc.get("spec", {}).get("workerGroupSpecs", [])
        except ApiException:
            specs = []  # the cluster may be gone already (an upgrade finishing)
        for g in specs:
            pods = core.list_namespaced_pod(
                namespace, label_selector=f"ray.io/cluster={cluster},ray.io/group={g['groupName']}"
            ).items
            desired = int(g.get("replicas", 0)) * int(g.get("numOfHosts", 1))
            groups[g["groupName"]] = {"ready": sum(_ready(p) for p in pods), "desired": desired}
        out["clusters"][role.removesuffix("ServiceStatus")] = {
            "name": cluster,
            "applications": apps,
            "groups": groups,
        }
    return out


def render_lines(state: dict[str, Any]) -> list[str]:
    lines = [
        f"RayService {state['namespace']}/{state['name']}: {state['service_status'] or 'unknown'}, "
        f"{state['endpoints']} serve endpoint(s)"
    ]
    for c in state["conditions"]:
        why = f" ({c['reason']}: {c['message']})" if c["reason"] or c["message"] else ""
        lines.append(f"  condition {c['type']}={c['status']}{why}")
    if "pending" not in state["clusters"]:
        lines.append("  pending cluster: none")
    for role in ("active", "pending"):
        cl = state["clusters"].get(role)
        if not cl:
            continue
        lines.append(f"  {role} cluster {cl['name']}")
        for group, g in sorted(cl["groups"].items()):
            lines.append(f"    worker group {group:<10} {g['ready']}/{g['desired']} pods ready")
        for app, a in sorted(cl["applications"].items()):
            lines.append(
                f"    application {app}: {a['status']}" + (f" - {a['message']}" if a["message"] else "")
            )
            for d, v in sorted(a["deployments"].items()):
                msg = f" - {v['message']}" if v["message"] else ""
                lines.append(f"      {d:<16} {v['status']}{msg}")
    return lines

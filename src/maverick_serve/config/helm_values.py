"""The Helm chart's values, typed: `cluster` is a `ClusterConfig`, the rest are the chart's own keys.

`helm/maverick-serve/values.schema.json` is generated from `HelmValues` (`maverick-serve config
schema --helm`), so `helm install` refuses an unknown key or a wrong type with the key's path; the
chart's values.yaml must equal these defaults (tests/helm checks both). Kubernetes pass-through
fields (resources, tolerations, affinity, security contexts) stay free-form objects here and are
validated against the Kubernetes schemas after rendering.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from maverick_serve.config.cluster import ClusterConfig

KubeObject = dict[str, Any]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _resources(cpu: str, memory: str, cpu_limit: str | None = None) -> KubeObject:
    return {"requests": {"cpu": cpu, "memory": memory}, "limits": {"cpu": cpu_limit or cpu, "memory": memory}}


class ImageValues(_Strict):
    repository: str = Field("ghcr.io/maverick-serve/maverick-serve", description="Image repository.")
    tag: str = Field("", description="Tag; empty: the chart's appVersion plus -gpu (or -cpu).")
    gpu: bool = Field(True, description="Whether the default tag is the GPU image.")
    pullPolicy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", description="Pull policy.")
    pullSecrets: list[str] = Field(default_factory=list, description="Names of image pull secrets.")


class HeadValues(_Strict):
    resources: KubeObject = Field(
        default_factory=lambda: _resources("2", "8Gi", "4"), description="Head pod resources."
    )
    rayStartParams: dict[str, str] = Field(default_factory=dict, description="Extra `ray start` flags.")
    nodeSelector: dict[str, str] = Field(default_factory=dict, description="Head node selector.")
    tolerations: list[KubeObject] = Field(default_factory=list, description="Head tolerations.")
    affinity: KubeObject = Field(default_factory=dict, description="Head affinity.")


GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


class WorkerGroupValues(_Strict):
    gpusPerPod: int = Field(
        0, ge=0, description="GPUs per pod (nvidia.com/gpu); a node's GPUs for TP replicas."
    )
    cpusPerPod: float = Field(4, gt=0, description="CPUs per pod (requests = limits).")
    memory: str = Field("8Gi", description="Memory per pod (requests = limits).")
    numOfHosts: int = Field(1, ge=1, description="Pods per replica group (multi-host replicas).")
    minReplicas: int = Field(0, ge=0, description="Fewest pod groups the autoscaler keeps.")
    maxReplicas: int = Field(4, ge=0, description="Most pod groups the autoscaler makes.")
    shmSize: str = Field("8Gi", description="Size of /dev/shm (a memory emptyDir).")
    nodeSelector: dict[str, str] = Field(default_factory=dict, description="Node selector.")
    tolerations: list[KubeObject] = Field(default_factory=list, description="Tolerations.")
    affinity: KubeObject = Field(default_factory=dict, description="Affinity.")


def _gpu_group(min_replicas: int, max_replicas: int) -> WorkerGroupValues:
    return WorkerGroupValues(
        gpusPerPod=8,
        cpusPerPod=32,
        memory="512Gi",
        minReplicas=min_replicas,
        maxReplicas=max_replicas,
        shmSize="64Gi",
        tolerations=[GPU_TOLERATION],
    )


class RouterGroupValues(_Strict):
    cpusPerPod: float = Field(4, gt=0, description="CPUs per router pod.")
    memory: str = Field("8Gi", description="Memory per router pod.")
    minReplicas: int = Field(1, ge=0, description="Fewest router pods.")
    maxReplicas: int = Field(4, ge=0, description="Most router pods.")
    nodeSelector: dict[str, str] = Field(default_factory=dict, description="Node selector.")
    tolerations: list[KubeObject] = Field(default_factory=list, description="Tolerations.")
    affinity: KubeObject = Field(default_factory=dict, description="Affinity.")


class WorkerGroupsValues(_Strict):
    router: RouterGroupValues = Field(default_factory=RouterGroupValues, description="Router (CPU) pods.")
    engine: WorkerGroupValues = Field(
        default_factory=lambda: _gpu_group(1, 4), description="Engine replicas' GPU pods."
    )
    experts: WorkerGroupValues = Field(
        default_factory=lambda: _gpu_group(0, 4), description="Expert workers' GPU pods."
    )
    prefill: WorkerGroupValues = Field(
        default_factory=lambda: _gpu_group(0, 2), description="Prefill replicas' GPU pods."
    )


class AutoscalerValues(_Strict):
    enabled: bool = Field(True, description="KubeRay's in-tree autoscaler (adds/removes worker pods).")
    version: Literal["v1", "v2"] = Field("v2", description="Autoscaler version.")
    upscalingMode: Literal["Default", "Aggressive", "Conservative"] = Field(
        "Default", description="How fast pods are added."
    )
    idleTimeoutSeconds: int = Field(600, ge=0, description="Idle seconds before a worker pod goes.")
    resources: KubeObject = Field(
        default_factory=lambda: _resources("500m", "512Mi", "1") | {"limits": {"cpu": "1", "memory": "1Gi"}},
        description="Autoscaler sidecar resources.",
    )


class GcsFaultToleranceValues(_Strict):
    enabled: bool = Field(False, description="GCS state in Redis: Serve survives a head restart.")


class ClusterUpgradeOptions(_Strict):
    gatewayClassName: str = Field("", description="Gateway class of the incremental upgrade.")
    stepSizePercent: int = Field(25, ge=1, le=100, description="Traffic moved per step.")
    intervalSeconds: int = Field(60, ge=1, description="Seconds between steps.")
    maxSurgePercent: int = Field(25, ge=1, le=100, description="Extra capacity during the upgrade.")


class UpgradeStrategyValues(_Strict):
    type: Literal["NewCluster", "NewClusterWithIncrementalUpgrade", "None"] = Field(
        "NewCluster",
        description="NewCluster: 2x GPUs while switching; incremental: maxSurgePercent more; None.",
    )
    clusterUpgradeOptions: ClusterUpgradeOptions = Field(
        default_factory=ClusterUpgradeOptions, description="Options of NewClusterWithIncrementalUpgrade."
    )


class RayValues(_Strict):
    version: str = Field("2.60.0", description="Ray version of the image.")
    tokenAuth: bool = Field(True, description="Ray token authentication (authOptions.mode: token).")
    head: HeadValues = Field(default_factory=HeadValues, description="Head pod.")
    workerGroups: WorkerGroupsValues = Field(default_factory=WorkerGroupsValues, description="One per tier.")
    autoscaler: AutoscalerValues = Field(default_factory=AutoscalerValues, description="KubeRay autoscaler.")
    gcsFaultTolerance: GcsFaultToleranceValues = Field(
        default_factory=GcsFaultToleranceValues, description="GCS fault tolerance through Redis."
    )
    serviceUnhealthySecondThreshold: int = Field(900, ge=1, description="Unhealthy seconds before replacing.")
    upgradeStrategy: UpgradeStrategyValues = Field(
        default_factory=UpgradeStrategyValues, description="How changes to the cluster are rolled out."
    )


class PvcCreateValues(_Strict):
    size: str = Field("1Ti", description="Size of the created claim.")
    storageClassName: str = Field("", description="Storage class (empty: the default).")
    accessModes: list[str] = Field(default_factory=lambda: ["ReadWriteMany"], description="Access modes.")


class PvcValues(_Strict):
    enabled: bool = Field(False, description="Weights from a PersistentVolumeClaim.")
    existingClaim: str = Field("", description="Use this claim (empty: the chart creates one).")
    subPath: str = Field("", description="Folder of the checkpoint inside the volume.")
    create: PvcCreateValues = Field(
        default_factory=PvcCreateValues, description="The claim the chart creates."
    )


class SecretKeyRef(_Strict):
    name: str = Field("", description="Secret name.")
    key: str = Field("token", description="Key in the Secret.")


class DownloadValues(_Strict):
    enabled: bool = Field(
        False, description="Fill the volume from the Hugging Face Hub (head initContainer)."
    )
    repo: str = Field("meta-llama/Llama-4-Maverick-17B-128E-Instruct-FP8", description="Hub repository.")
    revision: str = Field("", description="Commit hash (40 hex digits), pinned.")
    tokenSecret: SecretKeyRef = Field(default_factory=SecretKeyRef, description="Secret with the Hub token.")


class ModelValues(_Strict):
    mountPath: str = Field("/models", description="Where the weights are mounted in Ray pods.")
    pvc: PvcValues = Field(default_factory=PvcValues, description="Volume with the weights.")
    download: DownloadValues = Field(default_factory=DownloadValues, description="Download into the volume.")


class RedisPersistence(_Strict):
    enabled: bool = Field(False, description="Append-only file on a volume (off: a cache).")
    size: str = Field("50Gi", description="Volume size.")
    storageClassName: str = Field("", description="Storage class.")


class RedisAuth(_Strict):
    existingSecret: str = Field("", description="Secret with the password (empty: generated and kept).")
    key: str = Field("redis-password", description="Key of the password.")


class BundledRedis(_Strict):
    image: str = Field("redis:7.4-alpine", description="Redis image.")
    maxmemory: str = Field("8gb", description="Memory for KV blocks before LRU eviction.")
    resources: KubeObject = Field(
        default_factory=lambda: _resources("1", "10Gi", "2"), description="Resources."
    )
    persistence: RedisPersistence = Field(default_factory=RedisPersistence, description="Persistence.")
    auth: RedisAuth = Field(default_factory=RedisAuth, description="Password.")


class ExternalRedis(_Strict):
    url: str = Field("", pattern=r"^$|^rediss?://[^@]*$", description="redis:// or rediss://, no password.")
    existingSecret: str = Field("", description="Secret with the password.")
    key: str = Field("redis-password", description="Key of the password.")


class RedisValues(_Strict):
    mode: Literal["bundled", "external", "none"] = Field("bundled", description="Where Redis comes from.")
    bundled: BundledRedis = Field(default_factory=BundledRedis, description="The chart's StatefulSet.")
    external: ExternalRedis = Field(default_factory=ExternalRedis, description="Your Redis.")


class ApiKeysValues(_Strict):
    existingSecret: str = Field("", description="Secret with the hashed keys (JSON); empty: no API keys.")
    key: str = Field("keys.json", description="Key of the JSON list in the Secret.")


class ServiceValues(_Strict):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field("ClusterIP", description="Service type.")
    port: int = Field(8000, ge=1, le=65535, description="Serve's port.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Service annotations.")


class IngressPath(_Strict):
    path: str = Field("/", description="Path.")
    pathType: Literal["Prefix", "Exact", "ImplementationSpecific"] = Field("Prefix", description="Path type.")


class IngressHost(_Strict):
    host: str = Field(description="Host name.")
    paths: list[IngressPath] = Field(default_factory=lambda: [IngressPath()], description="Paths.")


class IngressValues(_Strict):
    enabled: bool = Field(False, description="Render an Ingress.")
    className: str = Field("", description="Ingress class.")
    annotations: dict[str, str] = Field(default_factory=dict, description="More annotations.")
    timeoutSeconds: int = Field(600, ge=1, description="Proxy read/send timeout (whole requests, SSE).")
    hosts: list[IngressHost] = Field(
        default_factory=lambda: [IngressHost(host="maverick.example.com")], description="Hosts."
    )
    tls: list[KubeObject] = Field(default_factory=list, description="TLS sections.")


class HttpRouteValues(_Strict):
    enabled: bool = Field(False, description="Render a Gateway API HTTPRoute.")
    parentRefs: list[KubeObject] = Field(default_factory=list, description="Gateways to attach to.")
    hostnames: list[str] = Field(default_factory=list, description="Host names.")
    requestTimeout: str = Field("600s", pattern=r"^[0-9]+(ms|s|m|h)$", description="Request timeout.")


class NetworkPolicyValues(_Strict):
    enabled: bool = Field(True, description="Render the NetworkPolicies.")
    ingressNamespaceSelector: KubeObject = Field(
        default_factory=lambda: {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
        description="Namespaces that may reach Serve's port.",
    )
    operatorNamespaceSelector: KubeObject = Field(
        default_factory=lambda: {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
        description="The KubeRay operator's namespace (dashboard, agents, Serve health).",
    )
    monitoringNamespaceSelector: KubeObject = Field(
        default_factory=lambda: {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
        description="Namespaces that may scrape metrics.",
    )


class PdbValues(_Strict):
    enabled: bool = Field(True, description="PodDisruptionBudgets per worker group.")
    maxUnavailable: int = Field(1, ge=0, description="Pods of a group evicted at once.")


class ServiceAccountValues(_Strict):
    create: bool = Field(True, description="Create a ServiceAccount (no extra rights).")
    name: str = Field("", description="Its name (empty: the release's).")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations.")


class MonitorValues(_Strict):
    enabled: bool = Field(False, description="Render it.")
    interval: str = Field("15s", description="Scrape interval.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels your Prometheus selects.")


class DashboardsValues(_Strict):
    enabled: bool = Field(False, description="One ConfigMap per Grafana dashboard.")
    label: str = Field("grafana_dashboard", description="Label Grafana's sidecar watches.")
    labelValue: str = Field("1", description="Its value.")


class RuleValues(_Strict):
    enabled: bool = Field(False, description="A PrometheusRule from ops/prometheus.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels your Prometheus selects.")


class MonitoringValues(_Strict):
    podMonitor: MonitorValues = Field(default_factory=MonitorValues, description="PodMonitor.")
    serviceMonitor: MonitorValues = Field(default_factory=MonitorValues, description="ServiceMonitor.")
    dashboards: DashboardsValues = Field(default_factory=DashboardsValues, description="Dashboards.")
    prometheusRule: RuleValues = Field(default_factory=RuleValues, description="Alert and recording rules.")
    prometheusHost: str = Field("", description="RAY_PROMETHEUS_HOST of the head.")
    grafanaHost: str = Field("", description="RAY_GRAFANA_HOST of the head.")
    grafanaIframeHost: str = Field("", description="RAY_GRAFANA_IFRAME_HOST of the head.")


class TestValues(_Strict):
    enabled: bool = Field(True, description="Render the `helm test` pod.")
    image: str = Field("", description="Its image (empty: the chart's image).")
    apiKeySecretKey: str = Field(
        "test-key", description="Key of a plain API key in apiKeys.existingSecret, for the test."
    )


class HelmValues(_Strict):
    """Root of the chart's values."""

    nameOverride: str = Field("", description="Replaces the chart name in object names.")
    fullnameOverride: str = Field("", description="Replaces release-chart in object names.")
    commonLabels: dict[str, str] = Field(default_factory=dict, description="Labels on every object.")
    image: ImageValues = Field(default_factory=ImageValues, description="The maverick-serve image.")
    cluster: ClusterConfig = Field(
        default_factory=ClusterConfig, description="The application (serveConfigV2 args)."
    )
    ray: RayValues = Field(default_factory=RayValues, description="The Ray cluster.")
    model: ModelValues = Field(default_factory=ModelValues, description="Weights volume.")
    redis: RedisValues = Field(default_factory=RedisValues, description="Redis for the KV tier and GCS.")
    apiKeys: ApiKeysValues = Field(default_factory=ApiKeysValues, description="API keys from a Secret.")
    service: ServiceValues = Field(default_factory=ServiceValues, description="Serve's Service.")
    ingress: IngressValues = Field(default_factory=IngressValues, description="Ingress.")
    httpRoute: HttpRouteValues = Field(default_factory=HttpRouteValues, description="Gateway API route.")
    networkPolicy: NetworkPolicyValues = Field(default_factory=NetworkPolicyValues, description="Policies.")
    podDisruptionBudget: PdbValues = Field(default_factory=PdbValues, description="PDBs.")
    serviceAccount: ServiceAccountValues = Field(default_factory=ServiceAccountValues, description="Account.")
    podSecurityContext: KubeObject = Field(
        default_factory=lambda: {
            "runAsNonRoot": True,
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 1000,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        description="Pod security context (restricted).",
    )
    securityContext: KubeObject = Field(
        default_factory=lambda: {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": False,
            "capabilities": {"drop": ["ALL"]},
        },
        description="Container security context (restricted).",
    )
    monitoring: MonitoringValues = Field(default_factory=MonitoringValues, description="Monitoring objects.")
    tests: TestValues = Field(default_factory=TestValues, description="`helm test`.")
    extraObjects: list[KubeObject | str] = Field(
        default_factory=list, description="More objects to render (templated)."
    )


def values_schema() -> dict[str, Any]:
    """values.schema.json: HelmValues' JSON schema, `cluster` left open in values.yaml's `{}` form."""
    schema = HelmValues.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}

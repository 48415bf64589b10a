{{/* Names and labels (the KubeRay / Helm conventions). */}}
{{- define "maverick.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "maverick.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "maverick.selectorLabels" -}}
app.kubernetes.io/name: {{ include "maverick.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "maverick.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "maverick.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: maverick-serve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "maverick.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "maverick.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "maverick.image" -}}
{{- $suffix := ternary "gpu" "cpu" .Values.image.gpu -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-%s" .Chart.AppVersion $suffix) .Values.image.tag) -}}
{{- end -}}

{{- define "maverick.redisName" -}}{{ include "maverick.fullname" . }}-redis{{- end -}}
{{- define "maverick.serveServiceName" -}}{{ include "maverick.fullname" . }}-serve{{- end -}}
{{- define "maverick.headServiceName" -}}{{ include "maverick.fullname" . }}-head{{- end -}}

{{/* The Redis password's Secret and key, or nothing when there is no Redis. */}}
{{- define "maverick.redisSecretName" -}}
{{- if eq .Values.redis.mode "bundled" -}}
{{- default (include "maverick.redisName" .) .Values.redis.bundled.auth.existingSecret -}}
{{- else if eq .Values.redis.mode "external" -}}
{{- .Values.redis.external.existingSecret -}}
{{- end -}}
{{- end -}}
{{- define "maverick.redisSecretKey" -}}
{{- if eq .Values.redis.mode "bundled" -}}{{ .Values.redis.bundled.auth.key }}{{- else -}}{{ .Values.redis.external.key }}{{- end -}}
{{- end -}}
{{- define "maverick.redisURL" -}}
{{- if eq .Values.redis.mode "bundled" -}}
{{- printf "redis://%s.%s.svc:6379/0" (include "maverick.redisName" .) .Release.Namespace -}}
{{- else -}}
{{- .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{/*
The cluster block with the ClusterConfig defaults the chart needs to size worker groups
(config/cluster.py is the source: a test renders without them and compares).
*/}}
{{- define "maverick.tiers" -}}
{{- $c := .Values.cluster | default dict -}}
{{- $res := $c.resources | default dict -}}
{{- $router := merge (deepCopy ($res.router | default dict)) (dict "replicas" 1 "num_cpus" 0.5 "num_gpus" 0) -}}
{{- $engine := merge (deepCopy ($res.engine | default dict)) (dict "replicas" 1 "num_cpus" 1 "num_gpus" 0) -}}
{{- $dis := $c.disaggregation | default dict -}}
{{- $prefill := merge (deepCopy ($dis.prefill | default dict)) (dict "replicas" 1 "num_cpus" 1 "num_gpus" 0) -}}
{{- $x := merge (deepCopy ($c.experts | default dict)) (dict "mode" "local" "ep_degree" 1 "worker_num_cpus" 1 "worker_num_gpus" 0) -}}
{{- $experts := dict "replicas" (ternary $x.ep_degree 0 (eq $x.mode "disaggregated")) "num_cpus" $x.worker_num_cpus "num_gpus" $x.worker_num_gpus "gpu_key" "cluster.experts.worker_num_gpus" "cpu_key" "cluster.experts.worker_num_cpus" -}}
{{- $_ := set $router "gpu_key" "cluster.resources.router.num_gpus" -}}{{- $_ := set $router "cpu_key" "cluster.resources.router.num_cpus" -}}
{{- $_ := set $engine "gpu_key" "cluster.resources.engine.num_gpus" -}}{{- $_ := set $engine "cpu_key" "cluster.resources.engine.num_cpus" -}}
{{- $_ := set $prefill "gpu_key" "cluster.disaggregation.prefill.num_gpus" -}}{{- $_ := set $prefill "cpu_key" "cluster.disaggregation.prefill.num_cpus" -}}
{{- if not $dis.enabled }}{{- $_ := set $prefill "replicas" 0 -}}{{- end -}}
{{- toYaml (dict "router" $router "engine" $engine "prefill" $prefill "experts" $experts) -}}
{{- end -}}

{{/*
Pods a tier's worker group needs for its replicas: by GPUs when the replicas take GPUs and the
group has them, else by CPUs. Fails, naming the keys, when one replica cannot fit a pod group.
*/}}
{{- define "maverick.groupPods" -}}
{{- $tier := index . 0 -}}{{- $t := index . 1 -}}{{- $g := index . 2 -}}
{{- $hosts := int (default 1 $g.numOfHosts) -}}
{{- $gpus := float64 (default 0 $g.gpusPerPod) -}}
{{- $cpus := float64 (default 1 $g.cpusPerPod) -}}
{{- $need := 0.0 -}}
{{- if gt (float64 $t.num_gpus) 0.0 -}}
{{- if gt (float64 $t.num_gpus) (mulf $gpus $hosts) -}}
{{- fail (printf "%s=%v: one %s replica needs more GPUs than ray.workerGroups.%s has (gpusPerPod=%v x numOfHosts=%d)" $t.gpu_key $t.num_gpus $tier $tier (default 0 $g.gpusPerPod) $hosts) -}}
{{- end -}}
{{- $need = ceil (divf (mulf $t.replicas $t.num_gpus) (mulf $gpus $hosts)) -}}
{{- else if gt (float64 $t.num_cpus) 0.0 -}}
{{- if gt (float64 $t.num_cpus) (mulf $cpus $hosts) -}}
{{- fail (printf "%s=%v: one %s replica needs more CPUs than ray.workerGroups.%s has (cpusPerPod=%v x numOfHosts=%d)" $t.cpu_key $t.num_cpus $tier $tier $g.cpusPerPod $hosts) -}}
{{- end -}}
{{- $need = ceil (divf (mulf $t.replicas $t.num_cpus) (mulf $cpus $hosts)) -}}
{{- end -}}
{{- $pods := int $need -}}
{{- if gt $pods (int $g.maxReplicas) -}}
{{- fail (printf "cluster: %d %s replica(s) need %d pod group(s) of ray.workerGroups.%s, above ray.workerGroups.%s.maxReplicas=%d" (int $t.replicas) $tier $pods $tier $tier (int $g.maxReplicas)) -}}
{{- end -}}
{{- max $pods (int $g.minReplicas) -}}
{{- end -}}

{{/* Checks across values that the schema cannot express; each message names the key. */}}
{{- define "maverick.validate" -}}
{{- $c := .Values.cluster | default dict -}}
{{- $kv := $c.kvtier | default dict -}}
{{- $store := $kv.store | default dict -}}
{{- $dis := $c.disaggregation | default dict -}}
{{- if and $dis.enabled (eq .Values.redis.mode "none") (ne (default "" $store.type) "redis") -}}
{{- fail "cluster.disaggregation.enabled hands KV from prefill to decode replicas through Redis: set redis.mode to bundled or external" -}}
{{- end -}}
{{- if and (eq .Values.redis.mode "external") (not .Values.redis.external.url) -}}
{{- fail "redis.mode is external: set redis.external.url (redis:// or rediss://, without the password)" -}}
{{- end -}}
{{- if and .Values.model.pvc.enabled (not .Values.model.pvc.existingClaim) (not .Values.model.pvc.create.size) -}}
{{- fail "model.pvc: set existingClaim or create.size" -}}
{{- end -}}
{{- if and .Values.model.download.enabled (not .Values.model.pvc.enabled) -}}
{{- fail "model.download.enabled fills a volume: set model.pvc.enabled (existingClaim or create)" -}}
{{- end -}}
{{- if and .Values.model.download.enabled (not (regexMatch "^[0-9a-f]{40}$" .Values.model.download.revision)) -}}
{{- fail "model.download.revision must be a 40-character commit hash, so every pod serves the same weights" -}}
{{- end -}}
{{- if and .Values.ray.gcsFaultTolerance.enabled (eq .Values.redis.mode "none") -}}
{{- fail "ray.gcsFaultTolerance.enabled stores GCS state in Redis: set redis.mode to bundled or external" -}}
{{- end -}}
{{- if and (eq .Values.ray.upgradeStrategy.type "NewClusterWithIncrementalUpgrade") (not .Values.ray.upgradeStrategy.clusterUpgradeOptions.gatewayClassName) -}}
{{- fail "ray.upgradeStrategy.type NewClusterWithIncrementalUpgrade needs ray.upgradeStrategy.clusterUpgradeOptions.gatewayClassName" -}}
{{- end -}}
{{- if contains "@" (default "" $store.url) -}}
{{- fail "cluster.kvtier.store.url must not carry credentials (they would sit in serveConfigV2): put the password in a Secret (redis.bundled.auth.existingSecret or redis.external.existingSecret)" -}}
{{- end -}}
{{- $x := $c.experts | default dict -}}
{{- if and (eq (default "local" $x.mode) "disaggregated") (eq (default "" $store.type) "memory") (gt (int (dig "resources" "engine" "replicas" 1 $c)) 1) -}}
{{- fail "cluster.kvtier.store.type memory is per replica: with several engine replicas use redis" -}}
{{- end -}}
{{- end -}}

{{/* The application's args: the cluster block plus what the chart owns. */}}
{{- define "maverick.appArgs" -}}
{{- $c := deepCopy (.Values.cluster | default dict) -}}
{{- $http := merge (deepCopy ($c.http | default dict)) (dict "host" "0.0.0.0" "port" (int .Values.service.port)) -}}
{{- $_ := set $http "host" "0.0.0.0" -}}
{{- $_ := set $c "http" $http -}}
{{- $res := deepCopy ($c.resources | default dict) -}}
{{- $_ := set $res "check_cluster_fit" false -}}
{{- range $tier := list "router" "engine" -}}
{{- $r := deepCopy (index $res $tier | default dict) -}}
{{- $_ := set $r "custom_resources" (merge (deepCopy ($r.custom_resources | default dict)) (dict (printf "maverick-%s" $tier) 1)) -}}
{{- $_ := set $res $tier $r -}}
{{- end -}}
{{- $_ := set $c "resources" $res -}}
{{- $dis := deepCopy ($c.disaggregation | default dict) -}}
{{- $p := deepCopy ($dis.prefill | default dict) -}}
{{- $_ := set $p "custom_resources" (merge (deepCopy ($p.custom_resources | default dict)) (dict "maverick-prefill" 1)) -}}
{{- $_ := set $dis "prefill" $p -}}
{{- $_ := set $c "disaggregation" $dis -}}
{{- $x := deepCopy ($c.experts | default dict) -}}
{{- $_ := set $x "worker_custom_resources" (merge (deepCopy ($x.worker_custom_resources | default dict)) (dict "maverick-experts" 1)) -}}
{{- $_ := set $c "experts" $x -}}
{{- if .Values.model.pvc.enabled -}}
{{- $m := deepCopy ($c.model | default dict) -}}
{{- $_ := set $m "path" (default .Values.model.mountPath $m.path) -}}
{{- $_ := set $c "model" $m -}}
{{- end -}}
{{- if ne .Values.redis.mode "none" -}}
{{- $kv := deepCopy ($c.kvtier | default dict) -}}
{{- $store := deepCopy ($kv.store | default dict) -}}
{{- if eq (default "redis" $store.type) "redis" -}}
{{- $_ := set $store "type" "redis" -}}
{{- $_ := set $store "url" (default (include "maverick.redisURL" .) $store.url) -}}
{{- if include "maverick.redisSecretName" . -}}
{{- $_ := set $store "password_env" "MAVERICK_REDIS_PASSWORD" -}}
{{- end -}}
{{- $_ := set $kv "store" $store -}}
{{- $_ := set $c "kvtier" $kv -}}
{{- end -}}
{{- end -}}
{{- if .Values.apiKeys.existingSecret -}}
{{- $router := deepCopy ($c.router | default dict) -}}
{{- $auth := deepCopy ($router.auth | default dict) -}}
{{- $_ := set $auth "enabled" true -}}
{{- $_ := set $auth "keys_file" (printf "/etc/maverick/api-keys/%s" .Values.apiKeys.key) -}}
{{- $_ := set $router "auth" $auth -}}
{{- $_ := set $c "router" $router -}}
{{- end -}}
{{- toYaml $c -}}
{{- end -}}

{{- define "maverick.serveConfig" -}}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: {{ .Values.service.port }}
applications:
  - name: {{ (.Values.cluster | default dict).app_name | default "maverick" }}
    route_prefix: /
    import_path: maverick_serve.serving.builder:app_builder
    args:
{{ include "maverick.appArgs" . | indent 6 }}
{{- if ((.Values.cluster | default dict).autoscaling | default dict).enabled }}
    # Our app-level policy sizes router, engine and prefill inside one GPU budget; Serve's
    # unschedulable replicas then become KubeRay autoscaler demand (worker pods).
    autoscaling_policy:
      policy_function: maverick_serve.autoscaling.serve_policy:ClusterAutoscaler
      policy_kwargs:
        deployments: {Router: router, LlamaEngine: engine, LlamaPrefill: prefill}
        cluster:
{{ include "maverick.appArgs" . | indent 10 }}
{{- end }}
{{- end -}}

{{/* Environment of every Ray container: secrets only through secretKeyRef. */}}
{{- define "maverick.env" -}}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
{{- if include "maverick.redisSecretName" . }}
- name: MAVERICK_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "maverick.redisSecretName" . }}
      key: {{ include "maverick.redisSecretKey" . }}
{{- end }}
{{- /* Serve's data plane, read by each Ray process at start (ServeRuntimeConfig.environment). */}}
{{- $sr := (default dict (default dict .Values.cluster).serve_runtime) }}
{{- $ingress := default "proxy" $sr.ingress }}
{{- $fast := ne (toString $sr.throughput_optimized) "false" }}
{{- $direct := ne $ingress "proxy" }}
- name: RAY_SERVE_THROUGHPUT_OPTIMIZED
  value: "0"
- name: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD
  value: {{ $fast | ternary "0" "1" | quote }}
- name: RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP
  value: {{ $fast | ternary "0" "1" | quote }}
- name: RAY_SERVE_USE_GRPC_BY_DEFAULT
  value: {{ $fast | ternary "1" "0" | quote }}
- name: RAY_SERVE_ENABLE_DIRECT_INGRESS
  value: {{ $direct | ternary "1" "0" | quote }}
- name: RAY_SERVE_ENABLE_HA_PROXY
  value: {{ eq $ingress "haproxy" | ternary "1" "0" | quote }}
- name: RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT
  value: {{ eq $ingress "direct" | ternary .Values.service.port 30000 | quote }}
- name: RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT
  value: {{ eq $ingress "direct" | ternary (add1 .Values.service.port) 31000 | quote }}
- name: RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S
  value: {{ kindIs "invalid" $sr.direct_ingress_draining_s | ternary 2.0 $sr.direct_ingress_draining_s | float64 | quote }}
- name: RAY_SERVE_PORT_QUARANTINE_S
  value: {{ eq $ingress "direct" | ternary "0" "150" | quote }}
{{- /* Traces: Serve reads its switch from each process's environment (TracingConfig.environment). */}}
{{- $t := (default dict (default dict .Values.cluster.observability).tracing) }}
{{- if $t.enabled }}
- name: RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH
  value: maverick_serve.observability.tracing:span_processors
- name: RAY_SERVE_TRACING_SAMPLING_RATIO
  value: {{ kindIs "invalid" $t.sampling_ratio | ternary 0.01 $t.sampling_ratio | quote }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ default "http://localhost:4318" $t.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: http/protobuf
- name: OTEL_SERVICE_NAME
  value: {{ default "maverick-serve" $t.service_name | quote }}
- name: OTEL_BSP_MAX_QUEUE_SIZE
  value: {{ default 2048 $t.max_queue_size | quote }}
- name: MAVERICK_TRACING_EXPORT_TIMEOUT_S
  value: {{ default 5.0 $t.export_timeout_s | float64 | quote }}
- name: MAVERICK_TRACING_RECORD_CONTENT
  value: {{ eq (toString $t.record_content) "true" | ternary "1" "0" | quote }}
- name: MAVERICK_TRACING_ENGINE_STEPS
  value: {{ eq (toString $t.engine_steps) "true" | ternary "1" "0" | quote }}
{{- end }}
{{- end -}}

{{- define "maverick.volumes" -}}
- name: ray-tmp
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shm | default "8Gi" }}
{{- with .root }}
{{- if .Values.model.pvc.enabled }}
- name: model
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-model" (include "maverick.fullname" .)) .Values.model.pvc.existingClaim }}
{{- end }}
{{- if .Values.apiKeys.existingSecret }}
- name: api-keys
  secret:
    secretName: {{ .Values.apiKeys.existingSecret }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "maverick.volumeMounts" -}}
- name: ray-tmp
  mountPath: /tmp/ray
- name: dshm
  mountPath: /dev/shm
{{- if .Values.model.pvc.enabled }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  {{- with .Values.model.pvc.subPath }}
  subPath: {{ . }}
  {{- end }}
  readOnly: true
{{- end }}
{{- if .Values.apiKeys.existingSecret }}
- name: api-keys
  mountPath: /etc/maverick/api-keys
  readOnly: true
{{- end }}
{{- end -}}

{{/*
Roll the pods when a secret they read at start changes (the live Secret's data where the cluster
can be asked, else its name). serveConfigV2 is left out on purpose: KubeRay applies a changed
Serve config to the running cluster without replacing pods (no second set of GPUs).
*/}}
{{- define "maverick.checksums" -}}
{{- $ns := .Release.Namespace -}}
{{- range $what, $name := dict "redis-secret" (include "maverick.redisSecretName" .) "api-keys" .Values.apiKeys.existingSecret }}
{{- if $name }}
{{- $live := lookup "v1" "Secret" $ns $name }}
checksum/{{ $what }}: {{ (ternary (toJson ($live.data | default dict)) $name (not (empty $live))) | sha256sum }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
Names, labels and the pieces shared by the RayCluster and the RayService.
*/}}

{{/* Chart name, overridable with nameOverride. */}}
{{- define "expertmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix of every resource: "<release>-<chart>", or just the release name when it
already contains the chart name. Kept to 40 characters: KubeRay appends suffixes such as
"-raycluster-xxxxx-head-svc" and names must stay valid DNS labels.
*/}}
{{- define "expertmesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "expertmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select this release's pods (stable across upgrades). */}}
{{- define "expertmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "expertmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "expertmesh.labels" -}}
helm.sh/chart: {{ include "expertmesh.chart" . }}
{{ include "expertmesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: expertmesh
{{- end }}

{{- define "expertmesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "expertmesh.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "expertmesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Name of the chart's own Secret (operator key, Redis password, external Redis URL). */}}
{{- define "expertmesh.secretName" -}}
{{- include "expertmesh.fullname" . }}
{{- end }}

{{/* Secret and key holding the operator key. */}}
{{- define "expertmesh.adminKeySecretName" -}}
{{- default (include "expertmesh.secretName" .) .Values.auth.existingSecret }}
{{- end }}
{{- define "expertmesh.adminKeySecretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKey }}{{ else }}admin-key{{ end }}
{{- end }}

{{/* "true" when the chart runs its own Redis (no external URL or Secret given), else "". */}}
{{- define "expertmesh.redis.bundled" -}}
{{- if and .Values.redis.external.url .Values.redis.external.existingSecret }}
{{- fail "set only one of redis.external.url and redis.external.existingSecret" }}
{{- end }}
{{- if not (or .Values.redis.external.url .Values.redis.external.existingSecret) }}true{{ end }}
{{- end }}

{{- define "expertmesh.redis.fullname" -}}
{{- printf "%s-redis" (include "expertmesh.fullname" .) }}
{{- end }}

{{/* Secret and key holding the bundled Redis's password. */}}
{{- define "expertmesh.redis.passwordSecretName" -}}
{{- default (include "expertmesh.secretName" .) .Values.redis.auth.existingSecret }}
{{- end }}
{{- define "expertmesh.redis.passwordSecretKey" -}}
{{- if .Values.redis.auth.existingSecret }}{{ .Values.redis.auth.existingSecretKey }}{{ else }}redis-password{{ end }}
{{- end }}

{{/*
Environment that tells a process where Redis is: REDIS_URL, plus REDIS_PASSWORD for the
bundled server (Kubernetes substitutes $(REDIS_PASSWORD) into REDIS_URL).
*/}}
{{- define "expertmesh.redisEnv" -}}
{{- if include "expertmesh.redis.bundled" . }}
{{- $host := printf "%s.%s.svc" (include "expertmesh.redis.fullname" .) .Release.Namespace }}
{{- if .Values.redis.auth.enabled -}}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "expertmesh.redis.passwordSecretName" . }}
      key: {{ include "expertmesh.redis.passwordSecretKey" . }}
- name: REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:6379/0" $host | quote }}
{{- else -}}
- name: REDIS_URL
  value: {{ printf "redis://%s:6379/0" $host | quote }}
{{- end }}
{{- else -}}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (include "expertmesh.secretName" .) .Values.redis.external.existingSecret }}
      key: {{ if .Values.redis.external.existingSecret }}{{ .Values.redis.external.existingSecretKey }}{{ else }}redis-url{{ end }}
{{- end }}
{{- end }}

{{/* Named container ports of a Ray container; the head also serves GCS, dashboard and client. */}}
{{- define "expertmesh.rayPorts" -}}
{{- $root := .root }}
{{- if eq .nodeType "head" -}}
- name: gcs-server
  containerPort: 6379
- name: dashboard
  containerPort: 8265
- name: client
  containerPort: 10001
{{ end -}}
- name: metrics
  containerPort: 8080
- name: serve
  containerPort: {{ $root.Values.gateway.http.port }}
{{- if $root.Values.gateway.grpc.enabled }}
- name: serve-grpc
  containerPort: {{ $root.Values.gateway.grpc.port }}
{{- end }}
{{- end }}

{{/*
Pod template of a Ray head or worker. Arguments (a dict):
  root      the chart context (.)
  node      the values of the head or of one worker group
  nodeType  "head" or "worker"
  group     the worker group's name (workers only)
KubeRay replaces the container's command with `ray start ...` and adds its probes.
*/}}
{{- define "expertmesh.rayPodTemplate" -}}
{{- $root := .root }}
{{- $node := .node }}
{{- $component := ternary "ray-head" (printf "ray-worker-%s" (.group | default "")) (eq .nodeType "head") }}
{{- $resources := deepCopy ($node.resources | default dict) }}
{{- if gt (int ($node.gpus | default 0)) 0 }}
{{- $limits := $resources.limits | default dict }}
{{- $_ := set $limits "nvidia.com/gpu" (int $node.gpus) }}
{{- $_ := set $resources "limits" $limits }}
{{- end -}}
metadata:
  labels:
    {{- include "expertmesh.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ $component }}
    {{- with $root.Values.ray.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $root.Values.ray.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "expertmesh.serviceAccountName" $root }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.ray.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" (eq .nodeType "head") }}
      image: {{ include "expertmesh.image" $root | quote }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      ports:
        {{- include "expertmesh.rayPorts" . | nindent 8 }}
      env:
        - name: EXPERTMESH_ADMIN_KEY
          valueFrom:
            secretKeyRef:
              name: {{ include "expertmesh.adminKeySecretName" $root }}
              key: {{ include "expertmesh.adminKeySecretKey" $root }}
        {{- include "expertmesh.redisEnv" $root | nindent 8 }}
        {{- with $root.Values.ray.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $root.Values.ray.extraEnvFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.ray.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      lifecycle:
        preStop:
          exec:
            command: ["/bin/sh", "-c", "ray stop"]
      {{- if $root.Values.ray.sharedMemory.enabled }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
      {{- end }}
  {{- if $root.Values.ray.sharedMemory.enabled }}
  volumes:
    - name: dshm
      emptyDir:
        medium: Memory
        {{- with $root.Values.ray.sharedMemory.sizeLimit }}
        sizeLimit: {{ . }}
        {{- end }}
  {{- end }}
  {{- with $node.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $node.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $node.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
RayCluster spec: the `spec` of a RayCluster and the `rayClusterConfig` of a RayService.
*/}}
{{- define "expertmesh.rayClusterSpec" -}}
{{- $enabledGroups := list }}
{{- range $name, $group := .Values.ray.workerGroups }}
{{- if $group.enabled }}
{{- if gt (int $group.minReplicas) (int $group.maxReplicas) }}
{{- fail (printf "ray.workerGroups.%s: minReplicas (%d) is above maxReplicas (%d)" $name (int $group.minReplicas) (int $group.maxReplicas)) }}
{{- end }}
{{- if or (lt (int $group.replicas) (int $group.minReplicas)) (gt (int $group.replicas) (int $group.maxReplicas)) }}
{{- fail (printf "ray.workerGroups.%s: replicas (%d) must lie in minReplicas..maxReplicas (%d..%d)" $name (int $group.replicas) (int $group.minReplicas) (int $group.maxReplicas)) }}
{{- end }}
{{- $enabledGroups = append $enabledGroups $name }}
{{- end }}
{{- end -}}
rayVersion: {{ .Values.ray.version | quote }}
enableInTreeAutoscaling: {{ .Values.ray.autoscaler.enabled }}
{{- if .Values.ray.autoscaler.enabled }}
autoscalerOptions:
  upscalingMode: {{ .Values.ray.autoscaler.upscalingMode }}
  idleTimeoutSeconds: {{ .Values.ray.autoscaler.idleTimeoutSeconds }}
  {{- with .Values.ray.autoscaler.version }}
  version: {{ . }}
  {{- end }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- with .Values.ray.autoscaler.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.ray.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
headGroupSpec:
  serviceType: {{ .Values.ray.head.serviceType }}
  rayStartParams:
    {{- toYaml (.Values.ray.head.rayStartParams | default dict) | nindent 4 }}
  template:
    {{- include "expertmesh.rayPodTemplate" (dict "root" . "node" .Values.ray.head "nodeType" "head") | nindent 4 }}
{{- if $enabledGroups }}
workerGroupSpecs:
{{- range $name := $enabledGroups }}
{{- $group := index $.Values.ray.workerGroups $name }}
  - groupName: {{ $name }}
    replicas: {{ $group.replicas }}
    minReplicas: {{ $group.minReplicas }}
    maxReplicas: {{ $group.maxReplicas }}
    rayStartParams:
      {{- toYaml ($group.rayStartParams | default dict) | nindent 6 }}
    template:
      {{- include "expertmesh.rayPodTemplate" (dict "root" $ "node" $group "nodeType" "worker" "group" $name) | nindent 6 }}
{{- end }}
{{- else }}
workerGroupSpecs: []
{{- end }}
{{- end }}

{{/*
Ray Serve config (serveConfigV2) running the gateway application, plus extraApplications.
*/}}
{{- define "expertmesh.serveConfig" -}}
{{- $gw := .Values.gateway -}}
proxy_location: {{ $gw.proxyLocation }}
http_options:
  host: 0.0.0.0
  port: {{ $gw.http.port }}
{{- if $gw.grpc.enabled }}
grpc_options:
  port: {{ $gw.grpc.port }}
  grpc_servicer_functions:
    {{- toYaml $gw.grpc.servicerFunctions | nindent 4 }}
{{- end }}
applications:
  - name: {{ $gw.appName | quote }}
    import_path: {{ $gw.importPath | quote }}
    route_prefix: {{ $gw.routePrefix | quote }}
    {{- with $gw.args }}
    args:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    deployments:
      - name: {{ $gw.deploymentName | quote }}
        max_ongoing_requests: {{ $gw.maxOngoingRequests }}
        {{- with $gw.rayActorOptions }}
        ray_actor_options:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        autoscaling_config:
          min_replicas: {{ $gw.autoscaling.minReplicas }}
          max_replicas: {{ $gw.autoscaling.maxReplicas }}
          target_ongoing_requests: {{ $gw.autoscaling.targetOngoingRequests }}
          upscale_delay_s: {{ $gw.autoscaling.upscaleDelayS }}
          downscale_delay_s: {{ $gw.autoscaling.downscaleDelayS }}
  {{- with $gw.extraApplications }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}

{{/*
A Secret value that survives upgrades: the value given in values, else the one already in
the release's Secret, else a new random one. Arguments: root, key, value, length. Returns it
base64-encoded. (`helm template` cannot look the Secret up, so it always shows a new value.)
*/}}
{{- define "expertmesh.persistentSecretValue" -}}
{{- if .value }}
{{- .value | b64enc }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace (include "expertmesh.secretName" .root) }}
{{- $data := (get ($existing | default dict) "data") | default dict }}
{{- if hasKey $data .key }}
{{- index $data .key }}
{{- else }}
{{- randAlphaNum (int .length) | b64enc }}
{{- end }}
{{- end }}
{{- end }}

{{/* Names: the release's full name, shortened to a DNS label. */}}
{{- define "lpt-serve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "lpt-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object; `component` names the part (server, router, redis, trainer). */}}
{{- define "lpt-serve.labels" -}}
helm.sh/chart: {{ include "lpt-serve.chart" .root }}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{/* The labels a part's selector matches (a subset of its pods' labels). */}}
{{- define "lpt-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "lpt-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "lpt-serve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: the existing account to use when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "lpt-serve.image" -}}
{{- printf "%s:%s" .repository .tag -}}
{{- end -}}

{{/* Secrets: the name and key each one is read from (the user's existing Secret, or the chart's). */}}
{{- define "lpt-serve.authSecretName" -}}
{{- default (printf "%s-auth" (include "lpt-serve.fullname" .)) .Values.auth.existingSecret -}}
{{- end -}}

{{- define "lpt-serve.authSecretKey" -}}
{{- if .Values.auth.existingSecret -}}{{ .Values.auth.existingSecretKey }}{{- else -}}api-keys{{- end -}}
{{- end -}}

{{- define "lpt-serve.redisSecretName" -}}
{{- default (printf "%s-redis" (include "lpt-serve.fullname" .)) .Values.redis.auth.existingSecret -}}
{{- end -}}

{{- define "lpt-serve.redisSecretKey" -}}
{{- if .Values.redis.auth.existingSecret -}}{{ .Values.redis.auth.existingSecretKey }}{{- else -}}redis-password{{- end -}}
{{- end -}}

{{- define "lpt-serve.storeSecretName" -}}
{{- default (printf "%s-store" (include "lpt-serve.fullname" .)) .Values.externalStore.existingSecret -}}
{{- end -}}

{{- define "lpt-serve.storeSecretKey" -}}
{{- if .Values.externalStore.existingSecret -}}{{ .Values.externalStore.existingSecretKey }}{{- else -}}store-url{{- end -}}
{{- end -}}

{{/*
A generated secret that survives upgrades: the value already in the cluster's Secret when there is one
(lookup; offline renders such as `helm template` get a new random value), else a new random one.
Arguments: root, secret (its name), key, length.
*/}}
{{- define "lpt-serve.generatedSecret" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- index $existing.data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum (int .length) -}}
{{- end -}}
{{- end -}}

{{/* The in-chart Redis: its Service name and port. */}}
{{- define "lpt-serve.redisHost" -}}
{{- printf "%s-redis" (include "lpt-serve.fullname" .) -}}
{{- end -}}

{{- define "lpt-serve.redisPort" -}}6379{{- end -}}

{{/* The headless Service of the replicas (the router's upstream). */}}
{{- define "lpt-serve.replicasService" -}}
{{- printf "%s-replicas" (include "lpt-serve.fullname" .) -}}
{{- end -}}

{{/*
Whole CPUs of a Kubernetes CPU quantity, rounded up, at least 1: "4" -> 4, "2.5" -> 3, "500m" -> 1.
*/}}
{{- define "lpt-serve.cpuCount" -}}
{{- $cpu := toString . -}}
{{- $cores := 0.0 -}}
{{- if hasSuffix "m" $cpu -}}
{{- $cores = divf (trimSuffix "m" $cpu | float64) 1000 -}}
{{- else -}}
{{- $cores = float64 $cpu -}}
{{- end -}}
{{- max 1 (int (ceil $cores)) -}}
{{- end -}}

{{/* The label matchers of the service's own series in Prometheus (the ServiceMonitor's job is the Service). */}}
{{- define "lpt-serve.metricSelector" -}}
{{- printf "namespace=\"%s\", job=\"%s\"" .Release.Namespace (include "lpt-serve.fullname" .) -}}
{{- end -}}

{{/* Security context of every container: non-root (the image's numeric user), nothing writable but its volumes. */}}
{{- define "lpt-serve.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Pod security context for the lpt-serve image (docker/Dockerfile: USER 10001:10001). */}}
{{- define "lpt-serve.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Names and labels shared by every object of the chart. */}}

{{- define "kubetrain.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's full name: the release name when it already contains the chart's name. */}}
{{- define "kubetrain.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubetrain.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetrain.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "kubetrain.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetrain
{{- end -}}

{{- define "kubetrain.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetrain.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The Service (and so the ServiceMonitor's `job` label) of the operator's metrics. */}}
{{- define "kubetrain.metricsService" -}}
{{- printf "%s-metrics" (include "kubetrain.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
What the operator does in each namespace it serves; tests/test_chart.py checks these rules against the
operator's code (its API client calls and the Kopf calls its handlers imply): nothing missing, nothing unused.
*/}}
{{- define "kubetrain.namespacedRules" -}}
# Kopf lists and watches the jobs (handlers, daemons) and patches them (finalizer, progress annotations);
# the operator deletes a finished job after ttlSecondsAfterFinished.
- apiGroups: ["kubetrain.io"]
  resources: ["llmtrainingjobs"]
  verbs: ["list", "watch", "patch", "delete"]
# The operator writes the job's status.
- apiGroups: ["kubetrain.io"]
  resources: ["llmtrainingjobs/status"]
  verbs: ["patch"]
# Kopf indexes and watches worker pods; the operator creates and deletes them, lists a job's pods (the audit of
# the index) and reads one whose name is taken (whose it is).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
# The operator creates each job's headless Service, and its ConfigMap (patched when all workers relaunch); it
# reads them before (one of another's is a conflict) and adopts one an earlier job of the same name left.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch"]
# Data preparation: Kopf indexes and watches the stage's batch Jobs; the operator creates them (owned by the
# LLMTrainingJob, so the garbage collector deletes them with it), and deletes them at a suspend or when an
# earlier job of the same name left them.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "create", "delete"]
# Kopf posts core/v1 Events on the jobs (the operator's kopf.event calls and Kopf's own).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

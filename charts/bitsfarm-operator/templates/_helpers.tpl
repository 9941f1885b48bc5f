{{/* The chart's name, at most 63 characters. */}}
{{- define "bitsfarm-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The name of every object: the release name, with the chart's unless it already has it. */}}
{{- define "bitsfarm-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "bitsfarm-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bitsfarm-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "bitsfarm-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "bitsfarm-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: bitsfarm
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "bitsfarm-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "bitsfarm-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator's image. */}}
{{- define "bitsfarm-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The image of farm pods whose UploadFarm names none: the operator's own unless set. */}}
{{- define "bitsfarm-operator.farmImage" -}}
{{- default (include "bitsfarm-operator.image" .) .Values.farmImage }}
{{- end }}

{{/*
The RBAC rules of the operator: the same for the ClusterRole (all namespaces) and the Role (one
namespace). They mirror RULES in src/operator/rbac.rs, next to the controller code; the test
tests/chart.rs fails if the two differ. Every rule grants exactly the calls the operator makes.
*/}}
{{- define "bitsfarm-operator.rules" -}}
# The controller's primary watch (list, then watch) on UploadFarms; the startup wait for the CRD
# is a list of UploadFarms too. UploadFarms are never read one by one, created or changed.
- apiGroups: ["bitsfarm.io"]
  resources: ["uploadfarms"]
  verbs: ["list", "watch"]
# The status (observedGeneration, replicas, hosts, conditions) is written with server-side apply,
# a PATCH of the status subresource.
- apiGroups: ["bitsfarm.io"]
  resources: ["uploadfarms/status"]
  verbs: ["patch"]
# The farm's StatefulSet: server-side apply (a PATCH, which needs create as well when the object
# does not exist yet), the owns-watch (list, watch), and a get of its live replica count when the
# status hints at a scale-down. Removal is left to garbage collection.
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["create", "get", "list", "patch", "watch"]
# The headless, per-pod and shared Services: server-side apply, the owns-watch, and the sweep: the
# list of a farm's Services by its labels and delete of those it owns and no longer asks for (the
# per-pod Services of ordinals removed by a scale-down).
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "delete", "list", "patch", "watch"]
# The farm's ConfigMap (the servers' config.yaml): server-side apply and the owns-watch.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "list", "patch", "watch"]
# Each farm's handoff secret (the key its servers share to hand sessions to each other): created
# when missing (an existing one answers 409 and is kept). No Secret is ever read, listed or watched.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
# A scale-down asks each server it removes to drain (POST /drain on its admin port) through the
# API server's pod proxy, and reads the sessions it has left from the answer.
- apiGroups: [""]
  resources: ["pods/proxy"]
  verbs: ["create"]
# A farm's pods are listed (read only) to report each host's readiness and failing pods
# (CrashLoopBackOff, ImagePullBackOff) in the status.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# A farm's NetworkPolicy (spec.networkPolicy.enabled): server-side apply, the owns-watch that puts
# back one edited or deleted by hand, and the sweep: the list by the farm's labels and, once a farm
# no longer asks for it, delete of the one the farm owns (never a policy someone else made).
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create", "delete", "list", "patch", "watch"]
# A farm's PodDisruptionBudget (farms of two servers or more): server-side apply, the owns-watch
# that puts back one edited or deleted by hand, and the sweep: the list by the farm's labels and
# delete of the one the farm owns once it shrinks to one server or turns spec.disruptionBudget off.
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["create", "delete", "list", "patch", "watch"]
# Events on UploadFarms (Created, Scaled, ConfigRolledOut, InvalidSpec, ApplyFailed): created,
# then patched when the same event repeats (an event series).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

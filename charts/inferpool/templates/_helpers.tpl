{{/* Names, labels and images shared by the templates. */}}

{{/* The release's full name: the release name when it already says inferpool, else <release>-inferpool. */}}
{{- define "inferpool.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels that select the operator's pods. They never change, so the Deployment's selector never has to. */}}
{{- define "inferpool.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Labels on every object of the chart. */}}
{{- define "inferpool.labels" -}}
{{ include "inferpool.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: inferpool
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Labels of the pools' model-replica pods, as the operator sets them. */}}
{{- define "inferpool.replicaSelectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/component: model-replica
{{- end -}}

{{- define "inferpool.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "inferpool.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "inferpool.operatorImage" -}}
{{- $image := .Values.image -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "inferpool.sidecarImage" -}}
{{- printf "%s:%s" .Values.sidecar.image.repository (default .Chart.AppVersion .Values.sidecar.image.tag) -}}
{{- end -}}

{{/* The CUDA sidecar image, empty when none is configured. */}}
{{- define "inferpool.gpuSidecarImage" -}}
{{- with .Values.sidecar.gpuImage.repository -}}
{{- printf "%s:%s" . (default $.Chart.AppVersion $.Values.sidecar.gpuImage.tag) -}}
{{- end -}}
{{- end -}}

{{/* The Secret holding the operator's admin key. */}}
{{- define "inferpool.adminKeySecret" -}}
{{- default (printf "%s-admin-key" (include "inferpool.fullname" .)) .Values.adminKey.existingSecret -}}
{{- end -}}

{{/* Namespaces whose pools get the NetworkPolicy, one per line. */}}
{{- define "inferpool.networkPolicyNamespaces" -}}
{{- if .Values.networkPolicy.namespaces -}}
{{- join "\n" (uniq .Values.networkPolicy.namespaces) -}}
{{- else -}}
{{- default .Release.Namespace .Values.watchNamespace -}}
{{- end -}}
{{- end -}}

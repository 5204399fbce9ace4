{{/*
Names and labels shared by every object of the chart.
*/}}

{{/* The chart's name: "course-service" unless nameOverride. */}}
{{- define "course-service.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The objects' name: <release>-course-service, or the release name alone when it already contains the
chart's name (helm install course-service ... gives "course-service"). 63 characters at most (DNS label).
*/}}
{{- define "course-service.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "course-service.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The labels the Deployment's selector, the Service, the PDB and the ServiceMonitor select pods by.
They must never change after the first install: a Deployment's selector is immutable.
*/}}
{{- define "course-service.selectorLabels" -}}
app.kubernetes.io/name: {{ include "course-service.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Every object's labels: the selector labels plus version and ownership. */}}
{{- define "course-service.labels" -}}
helm.sh/chart: {{ include "course-service.chart" . }}
{{ include "course-service.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: inference
app.kubernetes.io/part-of: inference-course
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The Secret that holds COURSE_SERVICE_KEYS (and metrics-token). */}}
{{- define "course-service.secretName" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else }}
{{- printf "%s-keys" (include "course-service.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* The container's arguments after the image's entrypoint (python -m inference_course.service). */}}
{{- define "course-service.args" -}}
- {{ printf "--model=%s" .Values.model.path | quote }}
- {{ printf "--served-model-name=%s" .Values.server.servedModelName | quote }}
- "--host=0.0.0.0"
- {{ printf "--port=%d" (int .Values.server.port) | quote }}
- {{ printf "--max-in-flight=%d" (int .Values.server.maxInFlight) | quote }}
- {{ printf "--request-timeout=%v" .Values.server.requestTimeoutSeconds | quote }}
- {{ printf "--drain-timeout=%v" .Values.server.drainTimeoutSeconds | quote }}
{{- if .Values.server.profileEngine }}
- "--profile-engine"
{{- end }}
{{- range $name, $value := .Values.server.engineArgs }}
- {{ printf "--engine-arg=%s=%s" $name (toJson $value) | quote }}
{{- end }}
{{- range .Values.server.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

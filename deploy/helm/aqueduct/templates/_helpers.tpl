{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "aqueduct.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix of every resource: release name + chart name, unless the release name already contains it.
Truncated to 63 characters (DNS-1123 label).
*/}}
{{- define "aqueduct.fullname" -}}
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

{{/* Name of the operator's Deployment and (Cluster)Roles. */}}
{{- define "aqueduct.operatorName" -}}
{{- printf "%s-operator" (include "aqueduct.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* chart label: name-version. */}}
{{- define "aqueduct.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every resource carries (app.kubernetes.io/*). */}}
{{- define "aqueduct.labels" -}}
helm.sh/chart: {{ include "aqueduct.chart" . }}
{{ include "aqueduct.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: aqueduct
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels that select the operator's pods; never change them between upgrades. */}}
{{- define "aqueduct.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aqueduct.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* ServiceAccount of the operator. */}}
{{- define "aqueduct.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "aqueduct.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "aqueduct.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The image of a runtime's steps (dict "root" . "runtime" NAME): runtimeImages.NAME, else
<repository>-<family>:<tag>, where xgboost and lightgbm are served by the sklearn image (family sklearn).
The operator derives the same name from its own image when an AQUEDUCT_RUNTIME_IMAGE_* variable is missing.
*/}}
{{- define "aqueduct.runtimeImage" -}}
{{- $values := .root.Values }}
{{- $family := .runtime }}
{{- if has .runtime (list "xgboost" "lightgbm") }}
{{- $family = "sklearn" }}
{{- end }}
{{- $derived := printf "%s-%s:%s" $values.image.repository $family (default .root.Chart.AppVersion $values.image.tag) }}
{{- $own := index $values.runtimeImages .runtime | default "" }}
{{- if and (not $own) (ne $family .runtime) }}
{{- $own = index $values.runtimeImages $family | default "" }}
{{- end }}
{{- default $derived $own }}
{{- end }}

{{/*
The operator's RBAC rules, from the single source files/operator-rbac-rules.yaml (a YAML list of PolicyRules).
Fails the render if the file is missing or not a list.
*/}}
{{- define "aqueduct.rbacRules" -}}
{{- $raw := .Files.Get "files/operator-rbac-rules.yaml" }}
{{- if not $raw }}
{{- fail "files/operator-rbac-rules.yaml is missing from the chart" }}
{{- end }}
{{- $rules := fromYamlArray $raw }}
{{- if and (eq (len $rules) 1) (kindIs "string" (index $rules 0)) }}
{{- fail (printf "files/operator-rbac-rules.yaml is not a YAML list of rules: %s" (index $rules 0)) }}
{{- end }}
{{- toJson $rules }}
{{- end }}

{{/* Whether a PolicyRule touches a cluster-scoped resource (only a ClusterRole can grant it). */}}
{{- define "aqueduct.isClusterRule" -}}
{{- $clusterScoped := list "namespaces" "customresourcedefinitions" "clusterkopfpeerings" "nodes" "persistentvolumes" "storageclasses" "clusterroles" "clusterrolebindings" }}
{{- $hit := false }}
{{- range .resources }}
{{- if has . $clusterScoped }}{{ $hit = true }}{{ end }}
{{- end }}
{{- if $hit }}true{{ end }}
{{- end }}

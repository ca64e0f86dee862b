{{/* Names and labels shared by every template. */}}

{{- define "membrane.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release-scoped name: the release name alone when it already contains the chart's name. */}}
{{- define "membrane.fullname" -}}
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

{{/* Selector labels: never change after install (a DaemonSet's selector is immutable). */}}
{{- define "membrane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "membrane.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels for every object; the recommended set only when labels.recommended is on. */}}
{{- define "membrane.labels" -}}
{{ include "membrane.selectorLabels" . }}
{{- if .Values.labels.recommended }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: membrane
{{- end }}
{{- with .Values.labels.common }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "membrane.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "membrane.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "membrane.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Whether to render the CRD named .name: crds.install always/never, or auto = absent from the cluster,
or present and owned by this release (an upgrade must keep rendering a CRD it installed, or helm
would delete it with every policy in it). `helm template` has no cluster: lookup returns nothing, so
auto renders. Prints "true" or nothing.
*/}}
{{- define "membrane.installCRD" -}}
{{- $mode := .ctx.Values.crds.install -}}
{{- if not (has $mode (list "auto" "always" "never")) -}}
{{- fail (printf "crds.install: %q is not one of auto, always, never" $mode) -}}
{{- end -}}
{{- if eq $mode "always" -}}
true
{{- else if eq $mode "auto" -}}
{{- $existing := lookup "apiextensions.k8s.io/v1" "CustomResourceDefinition" "" .name -}}
{{- if not $existing -}}
true
{{- else -}}
{{- $ann := default dict $existing.metadata.annotations -}}
{{- if and (eq (get $ann "meta.helm.sh/release-name") .ctx.Release.Name) (eq (get $ann "meta.helm.sh/release-namespace") .ctx.Release.Namespace) -}}
true
{{- end -}}
{{- end -}}
{{- end -}}
{{- end }}

{{/* The hostPath volumes the agent, the CNI installer and the cleanup hook share. */}}
{{- define "membrane.hostVolumes" -}}
- name: bpffs
  hostPath:
    path: /sys/fs/bpf
    type: DirectoryOrCreate
- name: cgroup
  hostPath:
    path: /sys/fs/cgroup
    type: Directory
- name: state
  hostPath:
    path: /var/run/membrane
    type: DirectoryOrCreate
- name: cni-bin
  hostPath:
    path: {{ .Values.cni.binDir }}
    type: DirectoryOrCreate
- name: cni-conf
  hostPath:
    path: {{ .Values.cni.confDir }}
    type: DirectoryOrCreate
{{- end }}

{{/* Arguments of the CNI installer (deploy/cni/install.py in the image). */}}
{{- define "membrane.cniInstallArgs" -}}
- --bin-dir
- /host/cni/bin
- --conf-dir
- /host/cni/net.d
{{- with .Values.cni.confFile }}
- --conf-file
- {{ . | quote }}
{{- end }}
{{- end }}

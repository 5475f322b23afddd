{{- define "portcullis.labels" -}}
app.kubernetes.io/name: portcullis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "portcullis.selector" -}}
app.kubernetes.io/name: portcullis
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "portcullis.podSecurity" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "portcullis.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{- /* An image reference: image.registry, then the name (image.relay or image.connector),
with image.tag in place of the name's own tag when set. */}}
{{- define "portcullis.image" -}}
{{- $name := .name -}}
{{- with .root.Values.image.tag -}}
{{- $name = printf "%s:%s" (regexReplaceAll ":[^:/]+$" $name "") . -}}
{{- end -}}
{{- with .root.Values.image.registry -}}
{{- printf "%s/%s" (trimSuffix "/" .) $name -}}
{{- else -}}
{{- $name -}}
{{- end -}}
{{- end -}}

{{- /* Pod placement and identity shared by both halves: .part is relay or connector. */}}
{{- define "portcullis.podPlacement" -}}
{{- $part := index .root.Values .part -}}
{{- with .root.Values.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- if .root.Values.serviceAccount.create }}
serviceAccountName: {{ .root.Values.serviceAccount.name | default .root.Release.Name }}
{{- else if .root.Values.serviceAccount.name }}
serviceAccountName: {{ .root.Values.serviceAccount.name }}
{{- end }}
{{- with $part.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $part.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $part.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "tulle-cni.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: tulle-cni
app.kubernetes.io/part-of: tulle
app.kubernetes.io/version: {{ .Values.image.version | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
# The proxy injector never touches the plugin's own objects.
tulle.dev/cni-resource: "true"
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "tulle-cni.selectorLabels" -}}
app.kubernetes.io/name: tulle-cni
tulle.dev/cni-resource: "true"
{{- end }}

{{- define "tulle-cni.resources" -}}
{{- $requests := dict -}}
{{- $limits := dict -}}
{{- range $name := list "cpu" "memory" "ephemeral-storage" -}}
{{- with index $ $name -}}
{{- if .request }}{{ $_ := set $requests $name (toString .request) }}{{ end -}}
{{- if .limit }}{{ $_ := set $limits $name (toString .limit) }}{{ end -}}
{{- end -}}
{{- end -}}
{{- if $requests }}
requests: {{- toYaml $requests | nindent 2 }}
{{- end }}
{{- if $limits }}
limits: {{- toYaml $limits | nindent 2 }}
{{- end }}
{{- if not (or $requests $limits) }}{}{{ end }}
{{- end }}

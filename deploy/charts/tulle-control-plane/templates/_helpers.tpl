{{/* Names, labels and pieces every control-plane template shares. */}}

{{- define "tulle.namespace" -}}{{ .Release.Namespace }}{{- end }}

{{- define "tulle.trustDomain" -}}{{ .Values.identityTrustDomain | default .Values.clusterDomain }}{{- end }}

{{- define "tulle.version" -}}{{ .Values.controllerImageVersion | default .Chart.AppVersion }}{{- end }}

{{- define "tulle.controllerImage" -}}{{ printf "%s:%s" .Values.controllerImage (include "tulle.version" .) }}{{- end }}

{{- define "tulle.natsImage" -}}
{{- printf "%s:%s" (.Values.nats.image.name | default .Values.controllerImage) (.Values.nats.image.version | default (include "tulle.version" .)) -}}
{{- end }}

{{- define "tulle.proxyImage" -}}
{{- printf "%s:%s" (.Values.proxy.image.name | default .Values.controllerImage) (.Values.proxy.image.version | default (include "tulle.version" .)) -}}
{{- end }}

{{/* The URL every client of the bus dials: TLS, through the client Service. */}}
{{- define "tulle.natsURL" -}}
{{- printf "tls://tulle-nats.%s.svc.%s:4222" .Release.Namespace .Values.clusterDomain -}}
{{- end }}

{{- define "tulle.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: tulle
app.kubernetes.io/part-of: tulle
app.kubernetes.io/version: {{ include "tulle.version" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
tulle.dev/control-plane-ns: {{ .Release.Namespace }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one component: call with (dict "root" $ "component" "destination"). */}}
{{- define "tulle.componentLabels" -}}
{{ include "tulle.labels" .root }}
app.kubernetes.io/component: {{ .component }}
tulle.dev/control-plane-component: {{ .component }}
{{- end }}

{{- define "tulle.selectorLabels" -}}
tulle.dev/control-plane-ns: {{ .root.Release.Namespace }}
tulle.dev/control-plane-component: {{ .component }}
{{- end }}

{{/* The pod template's metadata of one component. */}}
{{- define "tulle.podMetadata" -}}
labels:
  {{- include "tulle.componentLabels" . | nindent 2 }}
  {{- with .root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  tulle.dev/created-by: {{ printf "tulle/helm %s" (include "tulle.version" .root) | quote }}
  tulle.dev/inject: disabled
  {{- with .root.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- with .checksum }}
  checksum/config: {{ . }}
  {{- end }}
{{- end }}

{{/* Linkerd's resource shape ({cpu: {request, limit}, memory: {request, limit}}) as Kubernetes'. */}}
{{- define "tulle.resources" -}}
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

{{/* Pod-level security: non-root, the controller's ids, the runtime's seccomp profile. */}}
{{- define "tulle.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.controllerUID }}
runAsGroup: {{ .Values.controllerGID }}
fsGroup: {{ .Values.controllerGID }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security: read-only root filesystem, no privilege, no capability. */}}
{{- define "tulle.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: {{ .Values.controllerUID }}
runAsGroup: {{ .Values.controllerGID }}
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Scheduling shared by control-plane pods: call with (dict "root" $ "component" "identity"). */}}
{{- define "tulle.scheduling" -}}
{{- $v := .root.Values -}}
{{- with $v.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $v.imagePullSecrets }}
imagePullSecrets: {{- toYaml . | nindent 2 }}
{{- end }}
{{- if or $v.enablePodAntiAffinity .alwaysSpread }}
affinity:
  podAntiAffinity:
    {{- if $v.enablePodAntiAffinity }}
    requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels: {{- include "tulle.selectorLabels" . | nindent 10 }}
    {{- end }}
    preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: {{ if $v.enablePodAntiAffinity }}topology.kubernetes.io/zone{{ else }}kubernetes.io/hostname{{ end }}
        labelSelector:
          matchLabels: {{- include "tulle.selectorLabels" . | nindent 12 }}
{{- end }}
{{- end }}

{{/* Flags every service process takes to reach the bus. */}}
{{- define "tulle.serviceArgs" -}}
- --kubernetes
- --nats={{ include "tulle.natsURL" .root }}
- --nats-creds=/var/run/tulle/nats/creds
- --nats-ca=/var/run/tulle/nats-ca/ca.crt
{{- /* A copy of each bucket and of the event stream on every NATS server (JetStream keeps 5 at most). */}}
- --nats-replicas={{ min 5 (int .root.Values.nats.replicas) }}
- --admin=0.0.0.0:{{ .adminPort }}
- --log-level={{ .root.Values.controllerLogLevel }}
- --log-format={{ if eq .root.Values.controllerLogFormat "plain" }}console{{ else }}json{{ end }}
{{- end }}

{{/* Admin port, probes on it, and the common container settings of one service. */}}
{{- define "tulle.serviceContainer" -}}
image: {{ include "tulle.controllerImage" .root }}
imagePullPolicy: {{ .root.Values.imagePullPolicy }}
ports:
- name: admin-http
  containerPort: {{ .adminPort }}
  protocol: TCP
{{- with .extraPorts }}
{{ toYaml . }}
{{- end }}
livenessProbe:
  httpGet:
    path: /live
    port: admin-http
  initialDelaySeconds: 10
  periodSeconds: 10
  timeoutSeconds: 1
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /ready
    port: admin-http
  periodSeconds: 5
  timeoutSeconds: 1
  failureThreshold: 7
securityContext: {{- include "tulle.containerSecurityContext" .root | nindent 2 }}
{{- end }}

{{/* Volumes with the bus credential of one role and the bus CA: (dict "root" $ "role" "policy" "volume" "nats-creds-policy"). */}}
{{- define "tulle.natsCredsVolume" -}}
- name: {{ .volume }}
  secret:
    secretName: tulle-nats-credentials
    defaultMode: 0440
    items:
    - key: {{ .role }}
      path: creds
    {{- range .extraKeys }}
    - key: {{ . }}
      path: {{ . }}
    {{- end }}
{{- end }}

{{- define "tulle.natsCAVolume" -}}
- name: nats-ca
  secret:
    secretName: tulle-nats-tls
    defaultMode: 0444
    items:
    - key: ca.crt
      path: ca.crt
{{- end }}

{{- define "tulle.natsMounts" -}}
- name: {{ .volume }}
  mountPath: /var/run/tulle/nats
  readOnly: true
- name: nats-ca
  mountPath: /var/run/tulle/nats-ca
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* The env of every Python process in the image. */}}
{{- define "tulle.processEnv" -}}
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: TULLE_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: TULLE_POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end }}

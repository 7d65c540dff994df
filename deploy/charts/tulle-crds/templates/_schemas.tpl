{{/*
Pieces of OpenAPI v3 schema shared by the CRDs. Each one mirrors a rule of
tulle/resources/parse.py (what `tulle validate` refuses), so the API server refuses
the same manifests before the control plane ever reads them. Each named template
renders at column 0; callers indent it with nindent.
*/}}

{{- define "tulle.crds.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/name: tulle
app.kubernetes.io/part-of: tulle
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* How deep route and response conditions may nest (all / any / not). */}}
{{- define "tulle.crds.conditionDepth" -}}3{{- end }}

{{/* A port number (1-65535), a string of digits in that range, or a container port name (IANA, at most 15 characters). */}}
{{- define "tulle.crds.port" -}}
x-kubernetes-int-or-string: true
x-kubernetes-validations:
- rule: "type(self) == int ? (self >= 1 && self <= 65535) : (self.matches('^[0-9]+$') ? (int(self) >= 1 && int(self) <= 65535) : (size(self) <= 15 && self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')))"
  message: "expected a port from 1 to 65535 or a port name"
{{- end }}

{{/* A Go duration as the control plane reads it: '300ms', '10s', '1m30s'. */}}
{{- define "tulle.crds.duration" -}}
type: string
maxLength: 64
pattern: '^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$'
{{- end }}

{{/* A Kubernetes LabelSelector; an empty one selects everything. */}}
{{- define "tulle.crds.labelSelector" -}}
type: object
properties:
  matchLabels:
    type: object
    additionalProperties:
      type: string
  matchExpressions:
    type: array
    items:
      type: object
      required: [key, operator]
      properties:
        key:
          type: string
        operator:
          type: string
          enum: [In, NotIn, Exists, DoesNotExist]
        values:
          type: array
          items:
            type: string
      x-kubernetes-validations:
      - rule: "!(self.operator in ['In', 'NotIn']) || (has(self.values) && size(self.values) > 0)"
        message: "values: required for operator In and NotIn"
{{- end }}

{{/*
A route's request condition. Conditions nest (all / any / not); a CRD schema cannot
refer to itself, so the nesting is spelled out `depth` levels deep, and a condition
nested deeper is refused.
*/}}
{{- define "tulle.crds.requestMatch" -}}
{{- $depth := int . -}}
type: object
properties:
  method:
    type: string
    pattern: '^(?i:GET|HEAD|POST|PUT|DELETE|CONNECT|OPTIONS|TRACE|PATCH)$'
  pathRegex:
    type: string
{{- if gt $depth 1 }}
  all:
    type: array
    minItems: 1
    items: {{- include "tulle.crds.requestMatch" (sub $depth 1) | nindent 6 }}
  any:
    type: array
    minItems: 1
    items: {{- include "tulle.crds.requestMatch" (sub $depth 1) | nindent 6 }}
  not: {{- include "tulle.crds.requestMatch" (sub $depth 1) | nindent 4 }}
x-kubernetes-validations:
- rule: "has(self.method) || has(self.pathRegex) || has(self.all) || has(self.any) || has(self.not)"
  message: "a condition needs one of method, pathRegex, all, any, not"
{{- else }}
x-kubernetes-validations:
- rule: "has(self.method) || has(self.pathRegex)"
  message: "a condition nested this deep needs method or pathRegex (all, any and not nest at most {{ include "tulle.crds.conditionDepth" . }} levels)"
{{- end }}
{{- end }}

{{/* A response class's condition: a status range, or all / any / not of them. */}}
{{- define "tulle.crds.responseMatch" -}}
{{- $depth := int . -}}
type: object
properties:
  status:
    type: object
    properties:
      min:
        type: integer
        minimum: 100
        maximum: 599
      max:
        type: integer
        minimum: 100
        maximum: 599
    x-kubernetes-validations:
    - rule: "has(self.min) || has(self.max)"
      message: "status needs min, max or both"
    - rule: "!has(self.min) || !has(self.max) || self.min <= self.max"
      message: "status: min is greater than max"
{{- if gt $depth 1 }}
  all:
    type: array
    minItems: 1
    items: {{- include "tulle.crds.responseMatch" (sub $depth 1) | nindent 6 }}
  any:
    type: array
    minItems: 1
    items: {{- include "tulle.crds.responseMatch" (sub $depth 1) | nindent 6 }}
  not: {{- include "tulle.crds.responseMatch" (sub $depth 1) | nindent 4 }}
x-kubernetes-validations:
- rule: "has(self.status) || has(self.all) || has(self.any) || has(self.not)"
  message: "a response condition needs one of status, all, any, not"
{{- else }}
x-kubernetes-validations:
- rule: "has(self.status)"
  message: "a response condition nested this deep needs status (all, any and not nest at most {{ include "tulle.crds.conditionDepth" . }} levels)"
{{- end }}
{{- end }}

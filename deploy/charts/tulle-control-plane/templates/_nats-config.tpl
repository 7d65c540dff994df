{{- /*
The NATS server configuration of every replica of the StatefulSet. It mirrors what
tulle/natsserver.py starts in local mode (JetStream, max_payload, no cap on consumers),
adds what a cluster needs (routes between the replicas, TLS) and includes the bus's
authorization from "tulle.natsAuth" (templates/_nats-auth.tpl).
*/ -}}
{{- define "tulle.natsConfig" -}}
{{- $ns := .Release.Namespace -}}
{{- $domain := .Values.clusterDomain -}}
{{- $n := .Values.nats -}}
# One server per pod: its name (and JetStream node name) is the pod's.
server_name: $POD_NAME
listen: "0.0.0.0:4222"
# Monitoring, for the probes (/healthz). It shows no message contents or credentials.
http: "0.0.0.0:8222"
pid_file: "/var/run/nats/nats.pid"
max_payload: {{ $n.maxPayload }}
# On SIGTERM (or `nats-server --signal ldm`) stop accepting clients and move the
# connected ones to the other servers before exiting.
lame_duck_duration: "30s"
lame_duck_grace_period: "10s"

jetstream {
  store_dir: "/data/jetstream"
  max_memory_store: {{ $n.jetstream.maxMemoryStore }}
  max_file_store: {{ $n.jetstream.maxFileStore }}
  # Every KV watch is a consumer; nats-server 2.15 caps a stream at 1,000 of them by
  # default, which 1,000 proxy watches of tulle-endpoints reach. -1: no cap, as before 2.15.
  limits { default_max_consumers: -1 }
}

# Clients must use TLS (the bus leaves the node).
tls {
  cert_file: "/etc/nats/tls/tls.crt"
  key_file: "/etc/nats/tls/tls.key"
  timeout: 5
}
{{- if gt (int $n.replicas) 1 }}

cluster {
  name: {{ $n.clusterName | quote }}
  listen: "0.0.0.0:6222"
  # Every replica, by its stable name behind the headless Service; a server skips itself.
  routes: [
    {{- range $i := until (int $n.replicas) }}
    "nats-route://tulle-nats-{{ $i }}.tulle-nats-headless.{{ $ns }}.svc.{{ $domain }}:6222"{{ if lt (add1 $i) (int $n.replicas) }},{{ end }}
    {{- end }}
  ]
  # Routes prove themselves with the NATS certificate both ways: a route from
  # anything without it is refused, so no one joins the cluster around the bus's auth.
  tls {
    cert_file: "/etc/nats/tls/tls.crt"
    key_file: "/etc/nats/tls/tls.key"
    ca_file: "/etc/nats/tls/ca.crt"
    verify: true
    timeout: 5
  }
}
{{- end }}

{{ include "tulle.natsAuth" . }}
{{- end }}

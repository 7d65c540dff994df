{{- /*
#############################################################################################
# STUB — to be replaced by the output of the bus-authorization generator (tulle/busauth.py),
# the one module that writes the NATS server's accounts, users per role with their
# permissions, and the auth-callout block, for local mode, the tests and this chart alike.
#
# The replacement reads the public keys from .Values.nats.auth.<role>PublicKey
# (destination, policy, identity, injector, observer) and .Values.nats.auth.calloutIssuerPublicKey.
# Until then the bus has one account and NO user authentication: do not run this stub
# anywhere that matters.
#############################################################################################
*/ -}}
{{- define "tulle.natsAuth" -}}
# tulle.natsAuth: STUB (see templates/_nats-auth.tpl)
accounts {
  MESH {
    jetstream: enabled
  }
}
{{- end }}

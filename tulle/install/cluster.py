"""What an installed control plane already holds, read with the kubernetes client: the
trust anchors (ConfigMap tulle-identity-trust-roots), the issuer (Secret
tulle-identity-issuer), the bus's TLS (Secret tulle-nats-tls) and credentials (Secret
tulle-nats-credentials), and the values it was installed with (ConfigMap
tulle-install-values). `tulle upgrade` renders with them so nothing already trusted
changes and no setting is lost."""

from __future__ import annotations

import base64
from typing import Optional

from tulle.errors import UserError
from tulle.install import credentials
from tulle.install.credentials import BusCredentials
from tulle.install.material import ServerTLS
from tulle.install.values import Existing

TRUST_ROOTS = "tulle-identity-trust-roots"
ISSUER = "tulle-identity-issuer"
NATS_TLS = "tulle-nats-tls"
NATS_CREDENTIALS = "tulle-nats-credentials"
INSTALL_VALUES = "tulle-install-values"
INSTALL_VALUES_KEY = "values.yaml"


def api_client(kubeconfig: Optional[str] = None, context: Optional[str] = None):
    """An ApiClient for the given kubeconfig / context; without them, as kubectl: KUBECONFIG
    or ~/.kube/config, else the pod's service account."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        if kubeconfig or context:
            config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
        else:
            try:
                config.load_kube_config(client_configuration=cfg)
            except (config.ConfigException, OSError):
                config.load_incluster_config(client_configuration=cfg)
    except (config.ConfigException, OSError) as e:
        raise UserError(f"no Kubernetes API to read the installed control plane from: {_first_line(e)}") from None
    return client.ApiClient(cfg)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _read(core, kind: str, namespace: str, name: str) -> Optional[dict[str, str]]:
    """The data of a ConfigMap or Secret (decoded), or None when it does not exist."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        if kind == "ConfigMap":
            return dict(core.read_namespaced_config_map(name, namespace, _request_timeout=10).data or {})
        obj = core.read_namespaced_secret(name, namespace, _request_timeout=10)
        return {k: base64.b64decode(v).decode() for k, v in (obj.data or {}).items()}
    except ApiException as e:
        if e.status == 404:
            return None
        raise UserError(f"cannot read {kind} {namespace}/{name}: HTTP {e.status} {e.reason or ''}".rstrip()) from None
    except (HTTPError, OSError) as e:
        raise UserError(f"cannot reach the Kubernetes API to read {kind} {namespace}/{name}: {_first_line(e)}") from None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{kind} {namespace}/{name}: its data is not text") from None


def read_existing(namespace: str, *, kubeconfig: Optional[str] = None, context: Optional[str] = None,
                  need_trust: bool = True, with_values: bool = True) -> Existing:
    from kubernetes import client

    with api_client(kubeconfig, context) as api:
        core = client.CoreV1Api(api)
        existing = Existing()
        if need_trust:
            roots = _read(core, "ConfigMap", namespace, TRUST_ROOTS)
            if roots is None:
                raise UserError(f"ConfigMap {namespace}/{TRUST_ROOTS} not found: is Tulle installed in namespace "
                                f"{namespace}? (or give --identity-trust-anchors-file and the issuer's files)")
            existing.anchors_pem = roots.get("ca-bundle.crt", "")
            issuer = _read(core, "Secret", namespace, ISSUER) or {}
            existing.issuer_crt_pem, existing.issuer_key_pem = issuer.get("tls.crt", ""), issuer.get("tls.key", "")
        tls = _read(core, "Secret", namespace, NATS_TLS)
        if tls and all(tls.get(k) for k in ("ca.crt", "tls.crt", "tls.key")):
            existing.nats_tls = ServerTLS(tls["ca.crt"], tls["tls.crt"], tls["tls.key"])
        seeds = _read(core, "Secret", namespace, NATS_CREDENTIALS)
        if seeds:
            try:
                existing.bus = BusCredentials.from_seeds({r: seeds.get(r, "") for r in credentials.ROLES},
                                                         seeds.get(credentials.CALLOUT_ISSUER, ""))
            except ValueError as e:
                raise UserError(f"Secret {namespace}/{NATS_CREDENTIALS}: {e}") from None
        remembered = _read(core, "ConfigMap", namespace, INSTALL_VALUES) if with_values else None
        if remembered is not None:
            existing.install_values = _install_values(remembered.get(INSTALL_VALUES_KEY, ""), namespace)
        return existing


def _install_values(text: str, namespace: str) -> dict:
    import yaml

    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        values = None
    if not isinstance(values, dict):
        raise UserError(f"ConfigMap {namespace}/{INSTALL_VALUES}: {INSTALL_VALUES_KEY} is not a mapping of values "
                        f"(fix or delete it, or upgrade with --reset-values)")
    return values

"""Read one pod from the Kubernetes API with the standard library: the plugin runs on the
node with the host's python3, without the `kubernetes` package.

The kubeconfig is the one the installer writes (JSON, which is YAML too): one cluster
(server, certificate-authority-data or -file, or insecure-skip-tls-verify) and one user
(token or tokenFile).
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional


class KubeError(RuntimeError):
    pass


def load_kubeconfig(path: str) -> dict:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError as e:
        raise KubeError(f"kubeconfig {path}: cannot read: {e.strerror or e}") from None
    except ValueError:
        raise KubeError(f"kubeconfig {path}: not JSON (the installer writes it as JSON)") from None
    try:
        cluster = cfg["clusters"][0]["cluster"]
        user = (cfg.get("users") or [{"user": {}}])[0]["user"]
        return {"server": cluster["server"].rstrip("/"), "ca_data": cluster.get("certificate-authority-data", ""),
                "ca_file": cluster.get("certificate-authority", ""),
                "insecure": bool(cluster.get("insecure-skip-tls-verify")),
                "token": user.get("token", ""), "token_file": user.get("tokenFile", "")}
    except (KeyError, IndexError, TypeError, AttributeError):
        raise KubeError(f"kubeconfig {path}: expected clusters[0].cluster.server") from None


def get_pod(kubeconfig: str, namespace: str, name: str, timeout: float = 5.0) -> Optional[dict[str, Any]]:
    """The pod, or None when the API says it does not exist."""
    cfg = load_kubeconfig(kubeconfig)
    url = f"{cfg['server']}/api/v1/namespaces/{urllib.parse.quote(namespace)}/pods/{urllib.parse.quote(name)}"
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    token = cfg["token"]
    if cfg["token_file"]:
        try:
            token = open(cfg["token_file"]).read().strip()
        except OSError as e:
            raise KubeError(f"token file {cfg['token_file']}: cannot read: {e.strerror or e}") from None
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    ctx = None
    if url.startswith("https:"):
        ctx = ssl.create_default_context()
        if cfg["insecure"]:
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        elif cfg["ca_data"]:
            ctx = ssl.create_default_context(cadata=base64.b64decode(cfg["ca_data"]).decode())
        elif cfg["ca_file"]:
            ctx = ssl.create_default_context(cafile=cfg["ca_file"])
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise KubeError(f"GET {url}: {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise KubeError(f"GET {url}: {getattr(e, 'reason', e)}") from None

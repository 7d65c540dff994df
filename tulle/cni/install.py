"""tulle-cni-install: what the tulle-cni DaemonSet runs on each node.

    tulle-cni-install --cni-bin-dir /host/opt/cni/bin --cni-conf-dir /host/etc/cni/net.d \
        --node-cni-conf-dir /etc/cni/net.d --plugin-config /etc/tulle-cni/plugin.json [--watch]
    tulle-cni-install --uninstall ...

Places the plugin (one zipapp of the standard-library modules it needs, run by the
node's python3) as <bin dir>/tulle-cni, writes a kubeconfig for it when running in a
cluster (the DaemonSet's service account) or when --api-server is given, and appends
its entry to the node's primary conflist (a lone .conf is turned into a .conflist,
as Linkerd does). Idempotent: a second run replaces its entry, never adds another.
With --watch it stays, puts the entry back when the runtime's CNI rewrites the file,
keeps the kubeconfig's token current (projected tokens rotate), and on SIGTERM removes
itself (entry, plugin and kubeconfig).

The plugin runs on the node, not in the installer's container: the kubeconfig carries
the service account's token and CA inline, and the entry names the kubeconfig by the
node's path (--node-cni-conf-dir) where the installer writes it through a hostPath
mount (--cni-conf-dir).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sys
import tempfile
import time
import zipapp
from pathlib import Path
from typing import Optional

PLUGIN = "tulle-cni"
KUBECONFIG = "tulle-cni-kubeconfig"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# What the zipapp holds: the plugin and what it imports, all standard library.
MODULES = ("tulle/__init__.py", "tulle/cni/__init__.py", "tulle/cni/decide.py", "tulle/cni/kube.py",
           "tulle/cni/plugin.py", "tulle/proxyinit/__init__.py", "tulle/proxyinit/rules.py",
           "tulle/proxyinit/apply.py")


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def build_plugin(target: Path) -> None:
    """Write the zipapp to `target` (atomically: a runtime may be calling the old one)."""
    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        for rel in MODULES:
            dst = src / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes((root / rel).read_bytes())
        out = Path(tmp) / PLUGIN
        zipapp.create_archive(src, out, interpreter="/usr/bin/env python3", main="tulle.cni.plugin:entry")
        _atomic_write(target, out.read_bytes(), 0o755)


def kubeconfig(server: str, token: str = "", ca_file: str = "") -> dict:
    cluster: dict = {"server": server}
    if ca_file:
        cluster["certificate-authority-data"] = base64.b64encode(Path(ca_file).read_bytes()).decode()
    user = {"token": token} if token else {}
    return {"apiVersion": "v1", "kind": "Config", "clusters": [{"name": "local", "cluster": cluster}],
            "users": [{"name": "tulle-cni", "user": user}],
            "contexts": [{"name": "tulle-cni", "context": {"cluster": "local", "user": "tulle-cni"}}],
            "current-context": "tulle-cni"}


def primary_conf(conf_dir: Path, name: str = "") -> Optional[Path]:
    """The runtime reads the first configuration file in lexical order."""
    if name:
        return conf_dir / name
    files = sorted(p for p in conf_dir.iterdir() if p.suffix in (".conflist", ".conf", ".json") and p.is_file())
    return files[0] if files else None


def entry(plugin_conf: dict) -> dict:
    return {"type": PLUGIN, **plugin_conf}


def with_entry(conflist: dict, plugin_conf: dict) -> dict:
    """The conflist with Tulle's entry last (replacing an earlier one)."""
    out = dict(conflist)
    plugins = [p for p in out.get("plugins", []) if p.get("type") != PLUGIN]
    out["plugins"] = plugins + [entry(plugin_conf)]
    return out


def without_entry(conflist: dict) -> dict:
    out = dict(conflist)
    out["plugins"] = [p for p in out.get("plugins", []) if p.get("type") != PLUGIN]
    return out


def read_conf(path: Path) -> dict:
    data = json.loads(path.read_text())
    if "plugins" not in data:  # a single-plugin .conf: made a list
        data = {"cniVersion": data.get("cniVersion", "1.0.0"), "name": data.get("name", "k8s-pod-network"),
                "plugins": [data]}
    return data


def plugin_config(value: str) -> dict:
    """--plugin-config: a JSON object, or a file holding one (a mounted ConfigMap)."""
    if not value:
        return {}
    where = "--plugin-config"
    text = value
    if not value.lstrip().startswith("{"):
        where = f"--plugin-config {value}"
        try:
            text = Path(value).read_text()
        except OSError as e:
            raise ValueError(f"{where}: cannot read: {e.strerror or e}") from None
    try:
        conf = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where}: not JSON: {e}") from None
    if not isinstance(conf, dict):
        raise ValueError(f"{where}: expected a JSON object")
    return conf


def write_kubeconfig(args) -> Optional[Path]:
    """The plugin's kubeconfig (rewritten only when it changed): --api-server, else the
    in-cluster API with this pod's service account token and CA inline, since the plugin
    runs on the node where this container's files do not exist. None without an API."""
    server, token, ca_file = args.api_server, "", ""
    if not server and os.environ.get("KUBERNETES_SERVICE_HOST"):
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        server = f"https://{'[' + host + ']' if ':' in host else host}:{port}"
        sa = Path(args.service_account_dir)
        token, ca_file = (sa / "token").read_text().strip(), str(sa / "ca.crt")
    if not server:
        return None
    path = Path(args.cni_conf_dir) / KUBECONFIG
    data = json.dumps(kubeconfig(server, token, ca_file), indent=2).encode()
    if not path.is_file() or path.read_bytes() != data:
        _atomic_write(path, data, 0o600)
    return path


def install(args) -> Path:
    bin_dir, conf_dir = Path(args.cni_bin_dir), Path(args.cni_conf_dir)
    bin_dir.mkdir(parents=True, exist_ok=True)
    build_plugin(bin_dir / PLUGIN)
    plugin_conf = plugin_config(args.plugin_config)
    if write_kubeconfig(args) is not None:
        # The node's path: the container runtime runs the plugin there.
        plugin_conf.setdefault("kubernetes", {})["kubeconfig"] = str(Path(args.node_cni_conf_dir or conf_dir) / KUBECONFIG)
    target = primary_conf(conf_dir, args.conflist)
    if target is None:
        raise SystemExit(f"tulle-cni-install: no CNI configuration in {conf_dir} yet; "
                         "the cluster's network plugin writes one first")
    conflist = read_conf(target)
    new = with_entry(conflist, plugin_conf)
    if target.suffix != ".conflist":
        dst = target.with_suffix(".conflist")
        _atomic_write(dst, json.dumps(new, indent=2).encode(), 0o644)
        target.unlink()
        target = dst
    elif new != json.loads(target.read_text()):
        _atomic_write(target, json.dumps(new, indent=2).encode(), 0o644)
    print(f"tulle-cni installed: {bin_dir / PLUGIN}, entry in {target}", file=sys.stderr)
    return target


def uninstall(args) -> None:
    bin_dir, conf_dir = Path(args.cni_bin_dir), Path(args.cni_conf_dir)
    for path in sorted(conf_dir.glob("*.conflist")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if any(p.get("type") == PLUGIN for p in data.get("plugins", [])):
            _atomic_write(path, json.dumps(without_entry(data), indent=2).encode(), 0o644)
            print(f"tulle-cni entry removed from {path}", file=sys.stderr)
    for path in (bin_dir / PLUGIN, conf_dir / KUBECONFIG):
        path.unlink(missing_ok=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tulle-cni-install", description=__doc__.split("\n\n")[0])
    p.add_argument("--cni-bin-dir", default="/host/opt/cni/bin")
    p.add_argument("--cni-conf-dir", default="/host/etc/cni/net.d")
    p.add_argument("--conflist", default="", help="the file to edit (default: the first in the folder)")
    p.add_argument("--node-cni-conf-dir", default="",
                   help="where the node sees --cni-conf-dir (the entry names the kubeconfig by it; default: the same)")
    p.add_argument("--plugin-config", default="",
                   help="JSON object merged into Tulle's entry (proxy, exclude_namespaces ...), or a file holding it")
    p.add_argument("--api-server", default="", help="the API server URL for the plugin (default: in-cluster)")
    p.add_argument("--service-account-dir", default=str(SA_DIR),
                   help="where this pod's service account token and CA are mounted (in-cluster)")
    p.add_argument("--uninstall", action="store_true", help="remove the entry, the plugin and its kubeconfig")
    p.add_argument("--watch", action="store_true", help="keep the entry in place; uninstall on SIGTERM")
    p.add_argument("--interval", type=float, default=2.0, help="how often --watch looks at the conflist (s)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.uninstall:
        uninstall(args)
        return 0
    try:
        install(args)
    except (OSError, ValueError) as e:
        print(f"tulle-cni-install: {e}", file=sys.stderr)
        return 1
    if not args.watch:
        return 0
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    while not stop:
        time.sleep(args.interval)
        try:
            write_kubeconfig(args)  # a rotated service account token
            target = primary_conf(Path(args.cni_conf_dir), args.conflist)
            if target is not None and not any(p.get("type") == PLUGIN for p in read_conf(target).get("plugins", [])):
                install(args)
        except (OSError, ValueError) as e:
            print(f"tulle-cni-install: {e}", file=sys.stderr)
    uninstall(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

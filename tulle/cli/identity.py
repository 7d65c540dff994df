"""`tulle identity`: the mesh's trust anchors and issuer, and a workload's certificate.

    tulle identity init [--trust-domain D] [--out DIR] [--lifetime 8760h]
        a trust anchor and an issuer, as the identity service reads them:
        DIR/ca.crt (anchors bundle), DIR/issuer.crt, DIR/issuer.key (mode 0600)
    tulle identity init --anchor-cert ca.crt --anchor-key ca.key --out DIR
        a new issuer under an existing anchor (issuer rotation: the service reloads it)
    tulle identity [show] [WORKLOAD] [-n NAMESPACE] [-o table|json]
        the trust bundle published on the bus (anchors, issuer expiry) and, with a
        workload, its proxy's identity and certificate expiry (from its heartbeat)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import time
from pathlib import Path
from typing import Optional

import click

from tulle.cli.names import complete_namespace, workload_completer
from tulle.cli.common import connect_bus, nats_option

from tulle import pki, schemas
from tulle.errors import UserError
from tulle.log import setup_logging

TRUST_DOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class _ShowByDefault(click.Group):
    """`tulle identity [WORKLOAD]` means `tulle identity show [WORKLOAD]`."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["show", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_ShowByDefault)
def identity() -> None:
    """Trust anchors, the issuer, and workload certificates."""


# --- init ------------------------------------------------------------------------------------


def _duration(value: str, flag: str) -> dt.timedelta:
    from services.identity.ca import parse_duration

    try:
        d = parse_duration(value, flag)
    except ValueError as e:
        raise UserError(str(e)) from None
    if d.total_seconds() <= 0:
        raise UserError(f"{flag}: must be positive, got {value!r}")
    return d


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write whole-or-nothing (a running identity service may be watching the folder)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_file(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot read: {e.strerror or e}") from None


def make_issuer_material(trust_domain: str, issuer_lifetime: dt.timedelta, anchor_lifetime: dt.timedelta,
                         anchor: Optional[tuple[bytes, bytes]] = None) -> tuple[bytes, bytes, bytes, Optional[bytes]]:
    """(ca.crt, issuer.crt, issuer.key, new anchor key or None).

    With `anchor` = (anchors PEM, anchor key PEM), the issuer is signed by the anchor whose
    key that is, and ca.crt is the given bundle (which may hold several anchors).
    """
    if anchor is None:
        root = pki.new_trust_anchor(trust_domain, anchor_lifetime)
        anchors_pem, new_anchor_key = root.cert_pem, root.key_pem
    else:
        anchors_pem, key_pem = anchor
        try:
            key = pki.load_key(key_pem)
        except (ValueError, TypeError) as e:
            raise UserError(f"--anchor-key: not an ECDSA P-256 private key: {e}") from None
        try:
            certs = pki.load_certs(anchors_pem)
        except ValueError:
            certs = []
        match = [c for c in certs if c.public_key().public_numbers() == key.public_key().public_numbers()]
        if not match:
            raise UserError("--anchor-cert: no certificate in it matches --anchor-key")
        root = pki.CA(match[0], key)
        if root.cert.not_valid_after_utc < dt.datetime.now(dt.timezone.utc) + issuer_lifetime:
            raise UserError(f"--lifetime: the issuer would outlive its anchor "
                            f"(the anchor expires {root.cert.not_valid_after_utc:%Y-%m-%d})")
        new_anchor_key = None
    issuer = pki.new_issuer(root, trust_domain, issuer_lifetime)
    return anchors_pem, issuer.cert_pem, issuer.key_pem, new_anchor_key


@identity.command()
@click.option("--trust-domain", default="cluster.local", show_default=True, help="the mesh's trust domain")
@click.option("--out", "out", default=".", show_default=True, type=click.Path(file_okay=False),
              help="folder to write ca.crt, issuer.crt and issuer.key into")
@click.option("--lifetime", default="8760h", show_default=True, help="how long the issuer is valid")
@click.option("--anchor-lifetime", default="87600h", show_default=True,
              help="how long a new trust anchor is valid")
@click.option("--anchor-key-out", type=click.Path(dir_okay=False),
              help="also save the new anchor's private key here (0600), to sign future issuers")
@click.option("--anchor-cert", type=click.Path(dir_okay=False),
              help="sign the issuer with this existing anchor (with --anchor-key) instead of making one")
@click.option("--anchor-key", type=click.Path(dir_okay=False), help="private key of --anchor-cert")
@click.option("--force", is_flag=True, help="replace files that already exist")
def init(trust_domain: str, out: str, lifetime: str, anchor_lifetime: str, anchor_key_out: Optional[str],
         anchor_cert: Optional[str], anchor_key: Optional[str], force: bool) -> None:
    """Create a trust anchor and an issuer (ECDSA P-256) for local mode or Helm values."""
    if not TRUST_DOMAIN.match(trust_domain):
        raise UserError(f"--trust-domain: {trust_domain!r} is not a DNS name (lowercase letters, digits, '-', '.')")
    issuer_life = _duration(lifetime, "--lifetime")
    anchor_life = _duration(anchor_lifetime, "--anchor-lifetime")
    if bool(anchor_cert) != bool(anchor_key):
        raise UserError("--anchor-cert and --anchor-key go together")
    if anchor_cert and anchor_key_out:
        raise UserError("--anchor-key-out only applies when a new anchor is made (without --anchor-cert)")
    if not anchor_cert and issuer_life > anchor_life:
        raise UserError(f"--lifetime ({lifetime}) must not exceed --anchor-lifetime ({anchor_lifetime})")
    anchor = (_read_file(anchor_cert, "--anchor-cert"), _read_file(anchor_key, "--anchor-key")) if anchor_cert else None
    out_dir = Path(out)
    paths = {name: out_dir / name for name in ("ca.crt", "issuer.crt", "issuer.key")}
    if anchor_key_out:
        paths["anchor key"] = Path(anchor_key_out)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not force:
        raise UserError(f"{', '.join(existing)} already exist; pass --force to replace them")
    ca_pem, issuer_pem, issuer_key_pem, new_anchor_key = make_issuer_material(trust_domain, issuer_life, anchor_life, anchor)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if new_anchor_key is not None and anchor_key_out:
            _write(paths["anchor key"], new_anchor_key, 0o600)
        # The key before the certificate: a watcher never sees a certificate without its key.
        _write(paths["ca.crt"], ca_pem, 0o644)
        _write(paths["issuer.key"], issuer_key_pem, 0o600)
        _write(paths["issuer.crt"], issuer_pem, 0o644)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write: {e.strerror or e}") from None
    issuer_cert = pki.load_certs(issuer_pem)[0]
    click.echo(f"wrote {paths['ca.crt']} (trust anchors), {paths['issuer.crt']} and {paths['issuer.key']}")
    click.echo(f"trust domain {trust_domain}; issuer valid until {issuer_cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
    if new_anchor_key is not None and not anchor_key_out:
        click.echo("the anchor's private key was not kept: a new issuer will need a new anchor "
                   "(use --anchor-key-out to keep it)")


# --- show ------------------------------------------------------------------------------------


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _left(ts: float, now: float) -> str:
    s = int(ts - now)
    if s < 0:
        return f"expired {_span(-s)} ago"
    return f"in {_span(s)}"


def _span(s: int) -> str:
    if s >= 2 * 86400:
        return f"{s // 86400}d"
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _anchor_rows(bundle: schemas.TrustBundle) -> list[dict]:
    rows = []
    for cert in pki.load_certs(bundle.anchors_pem):
        rows.append({
            "subject": cert.subject.rfc4514_string(),
            "not_before": cert.not_valid_before_utc.timestamp(),
            "not_after": cert.not_valid_after_utc.timestamp(),
            "sha256": pki.fingerprint(pki.cert_pem(cert)),
        })
    return rows


async def _read(url: str, key: Optional[str], timeout_s: float) -> tuple[Optional[schemas.TrustBundle],
                                                                        Optional[schemas.ProxyHeartbeat]]:
    bus = await connect_bus(url, what="identity", timeout=timeout_s)
    try:
        bundle = heartbeat = None
        try:
            await bus.kv(schemas.IDENTITY_BUCKET, create=False)
            bundle = await bus.get(schemas.IDENTITY_BUCKET, schemas.TRUST_BUNDLE_KEY, schemas.TrustBundle)
        except Exception:
            pass  # no bucket: the identity service never ran against this NATS
        if key is not None:
            try:
                await bus.kv(schemas.PROXIES_BUCKET, create=False)
                heartbeat = await bus.get(schemas.PROXIES_BUCKET, key, schemas.ProxyHeartbeat)
            except Exception:
                pass
        return bundle, heartbeat
    finally:
        await bus.close()


@identity.command()
@click.argument("workload", required=False, shell_complete=workload_completer("default"))
@click.option("-n", "--namespace", default="default", show_default=True, shell_complete=complete_namespace)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@nats_option()
@click.option("--timeout", default="5s", show_default=True, help="how long to try reaching NATS")
def show(workload: Optional[str], namespace: str, output: str, url: str, timeout: str) -> None:
    """Show the trust anchors, the issuer's expiry and (with WORKLOAD) its proxy's certificate."""
    setup_logging("cli", "warning")
    timeout_s = _duration(timeout, "--timeout").total_seconds()
    if workload is not None and not NAME.match(workload):
        raise UserError(f"identity: {workload!r} is not a workload name")
    if not NAME.match(namespace):
        raise UserError(f"identity: --namespace {namespace!r} is not a namespace name")
    key = schemas.proxy_key(namespace, workload) if workload else None
    bundle, heartbeat = asyncio.run(_read(url, key, timeout_s))
    now = time.time()
    doc: dict = {"trust_domain": None, "anchors": [], "issuer_expiry": None}
    if bundle is not None:
        doc = {"trust_domain": bundle.trust_domain, "anchors": _anchor_rows(bundle),
               "issuer_expiry": bundle.issuer_expiry or None}
    if workload:
        doc["workload"] = None if heartbeat is None else {
            "namespace": heartbeat.namespace, "workload": heartbeat.workload, "identity": heartbeat.identity,
            "cert_expiry": heartbeat.cert_expiry or None, "ready": heartbeat.ready, "version": heartbeat.version,
            "heartbeat": heartbeat.time or None,
        }
    if output == "json":
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(_render(doc, now, f"{namespace}/{workload}" if workload else None))
    if bundle is None or (workload and heartbeat is None):
        raise click.exceptions.Exit(1)


def _render(doc: dict, now: float, workload: Optional[str]) -> str:
    lines = []
    if not doc["anchors"]:
        lines.append("no trust bundle published (is the identity service running against this NATS?)")
    else:
        lines.append(f"trust domain   {doc['trust_domain']}")
        lines.append(f"trust anchors  {len(doc['anchors'])}")
        for a in doc["anchors"]:
            lines.append(f"  {a['subject']}  expires {_iso(a['not_after'])} ({_left(a['not_after'], now)})  "
                         f"sha256 {a['sha256'][:16]}")
        if doc["issuer_expiry"]:
            lines.append(f"issuer         expires {_iso(doc['issuer_expiry'])} ({_left(doc['issuer_expiry'], now)})")
    if workload:
        w = doc.get("workload")
        lines.append("")
        if w is None:
            lines.append(f"{workload}: no heartbeat (not running, or its proxy is not connected to NATS)")
        else:
            lines.append(f"workload       {workload}")
            lines.append(f"  identity     {w['identity'] or '-'}")
            lines.append("  certificate  " + (f"expires {_iso(w['cert_expiry'])} ({_left(w['cert_expiry'], now)})"
                                               if w["cert_expiry"] else "none yet"))
            lines.append(f"  ready        {'yes' if w['ready'] else 'no'}")
            if w["heartbeat"]:
                lines.append(f"  heartbeat    {_span(max(0, int(now - w['heartbeat'])))} ago")
    return "\n".join(lines)

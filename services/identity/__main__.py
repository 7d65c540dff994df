"""python -m services.identity: the certificate authority of the mesh.

    python -m services.identity --issuer-dir DIR --token-secret-file F        (local mode)
    python -m services.identity --kubernetes --issuer-secret tulle/tulle-identity-issuer

Ready once connected to NATS, with an issuer loaded and the trust bundle published.
"""

from __future__ import annotations

import argparse
import os
import re

from services.identity.ca import CertificateAuthority, IssuerError, load_issuer, parse_duration
from services.identity.callout import CalloutResponder
from services.identity.ratelimit import RateLimiter
from services.identity.server import DEFAULT_CERTIFY_BURST, DEFAULT_CERTIFY_RATE, IdentityServer
from services.identity.sources import DirIssuerSource, SecretIssuerSource
from services.identity.tokens import KubeTokenVerifier, LocalTokenVerifier, token_audience
from tulle import natsjwt
from tulle.bus import Bus, BusCredentials
from tulle.errors import UserError
from tulle.service import Service, run_service


def _duration(what: str):
    def parse(value: str):
        try:
            return parse_duration(value, what)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a duration such as '24h', '20s' or '90m', got {value!r}") from None

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--issuer-dir", metavar="DIR",
                     help="folder with ca.crt (trust anchors), issuer.crt and issuer.key; reloaded when they change")
    src.add_argument("--issuer-secret", metavar="NS/NAME",
                     help="Kubernetes Secret with keys ca.crt, tls.crt, tls.key; watched for changes")
    p.add_argument("--token-secret-file", metavar="FILE",
                   help="local mode: the HMAC secret the local runner writes (tokens from tulle.pki.make_local_token)")
    p.add_argument("--kubernetes", action="store_true",
                   help="use the Kubernetes API (in-cluster or KUBECONFIG): TokenReview, and --issuer-secret")
    p.add_argument("--lifetime", type=_duration("--lifetime"),
                   default=os.environ.get("TULLE_IDENTITY_LIFETIME") or "24h",
                   help="lifetime of workload certificates (default 24h; env TULLE_IDENTITY_LIFETIME)")
    p.add_argument("--clock-skew", type=_duration("--clock-skew"), default=parse_duration("20s", "--clock-skew"),
                   help="certificates are valid from this long before issuance (default 20s)")
    p.add_argument("--trust-domain", default=os.environ.get("TULLE_TRUST_DOMAIN", "cluster.local"))
    p.add_argument("--callout-issuer-seed", metavar="FILE", default=os.environ.get("TULLE_CALLOUT_ISSUER_SEED", ""),
                   help="the account nkey seed nats-server trusts for auth callout: identity then lets workload "
                        "proxies onto the bus with their token (env TULLE_CALLOUT_ISSUER_SEED)")
    p.add_argument("--callout-creds", metavar="FILE", default=os.environ.get("TULLE_CALLOUT_CREDS", ""),
                   help="the `callout` user's nkey seed: the connection, in the bus's AUTH account, that receives "
                        "the logins (env TULLE_CALLOUT_CREDS)")
    p.add_argument("--certify-burst", type=float, default=DEFAULT_CERTIFY_BURST,
                   help=f"certificates one identity may get at once (default {DEFAULT_CERTIFY_BURST:g})")
    p.add_argument("--certify-rate", type=float, default=DEFAULT_CERTIFY_RATE,
                   help=f"certificates per second one identity may get beyond the burst (default {DEFAULT_CERTIFY_RATE:g})")
    p.add_argument("--watch-interval", type=_duration("--watch-interval"), default=parse_duration("1s", "--watch-interval"),
                   help="how often --issuer-dir files are checked for changes (default 1s)")
    # The local runner starts every service with its manifest folders; identity reads none.
    p.add_argument("--manifests", action="append", default=[], help=argparse.SUPPRESS)


def kube_api_client():
    """An ApiClient for the cluster we run in, else for the current KUBECONFIG context."""
    from kubernetes import client

    from tulle.sources.kube import default_configuration

    return client.ApiClient(default_configuration())


def build(svc: Service) -> IdentityServer:
    """Everything the flags describe, checked before anything starts (UserError: exit 2)."""
    args = svc.args
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", args.trust_domain):
        raise UserError(f"--trust-domain: {args.trust_domain!r} is not a DNS name (lowercase letters, digits, '-', '.')")
    if args.lifetime.total_seconds() <= 0:
        raise UserError(f"--lifetime must be positive, got {args.lifetime}")
    if not args.issuer_dir and not args.issuer_secret:
        raise UserError("give the issuer: --issuer-dir DIR or --issuer-secret NS/NAME")
    if args.issuer_secret and not args.kubernetes:
        raise UserError("--issuer-secret needs --kubernetes")
    if args.token_secret_file and args.kubernetes:
        raise UserError("give one way to check tokens: --token-secret-file (local mode) or --kubernetes (TokenReview)")
    if args.certify_rate <= 0 or args.certify_burst < 1:
        raise UserError("--certify-rate must be positive and --certify-burst at least 1")
    api = kube_api_client() if args.kubernetes else None
    audience = token_audience(args.trust_domain)
    if args.token_secret_file:
        verifier, concurrency = LocalTokenVerifier.from_file(args.token_secret_file, audience), 1
    elif api is not None:
        verifier, concurrency = KubeTokenVerifier(api, audience), 32  # TokenReviews wait on the API server
    else:
        raise UserError("give one way to check tokens: --token-secret-file F (local mode) or --kubernetes")
    if args.issuer_dir:
        source = DirIssuerSource(args.issuer_dir, interval_s=args.watch_interval.total_seconds())
        source.check_exists()
        pem = source.read()
        try:
            if pem.error:
                raise IssuerError(pem.error)
            load_issuer(pem.anchors, pem.cert, pem.key, names=pem.names)
        except IssuerError as e:
            raise UserError(f"--issuer-dir: {e}") from None
    else:
        ns, sep, name = args.issuer_secret.partition("/")
        if not sep or not ns or not name:
            raise UserError(f"--issuer-secret: expected NAMESPACE/NAME, got {args.issuer_secret!r}")
        source = SecretIssuerSource(api, ns, name)
    callout = None
    if bool(args.callout_issuer_seed) != bool(args.callout_creds):
        raise UserError("give both --callout-issuer-seed and --callout-creds, or neither")
    if args.callout_issuer_seed:
        try:
            seed = natsjwt.read_seed(args.callout_issuer_seed)
            natsjwt.public_key(seed)
        except (OSError, ValueError) as e:
            raise UserError(f"--callout-issuer-seed {args.callout_issuer_seed}: {getattr(e, 'strerror', None) or e}") from None
        bus = Bus(args.nats, component="identity", instance=f"{svc.bus.instance}-callout",
                  credentials=BusCredentials.for_seed(args.callout_creds, ca_file=args.nats_ca))
        callout = CalloutResponder(bus, verifier, seed)
    ca = CertificateAuthority(None, trust_domain=args.trust_domain, lifetime=args.lifetime, clock_skew=args.clock_skew)
    return IdentityServer(svc.bus, ca, verifier, source, concurrency=concurrency, callout=callout,
                          limiter=RateLimiter(args.certify_rate, args.certify_burst))


def entry() -> None:
    servers: list[IdentityServer] = []

    def prepare(svc: Service) -> None:
        server = build(svc)
        svc.add_ready_check("issuer loaded", lambda: server.issuer_loaded)
        svc.add_ready_check("trust bundle published", lambda: server.bundle_published)
        servers.append(server)

    async def main(svc: Service) -> None:
        await servers[0].run()

    run_service("identity", main, add_arguments=add_arguments, prepare=prepare)


if __name__ == "__main__":
    entry()

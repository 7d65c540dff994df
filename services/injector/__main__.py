"""python -m services.injector: the mutating admission webhook.

    python -m services.injector --tls-cert tls.crt --tls-key tls.key --values values.yaml
    python -m services.injector --kubernetes --tls-secret tulle/tulle-proxy-injector-k8s-tls \\
        --values /etc/tulle/values.yaml

Without a certificate (local mode) the webhook is off and the service only reports
ready. Serves AdmissionReview v1 over HTTPS on :8443 at `/` (the Service
`tulle-proxy-injector` in the control plane's namespace maps 443 to it). Ready once
the certificate is loaded, the listener is up and the bus is reached. Each pod it
injects or skips is an `injector.injected` / `injector.injection-skipped` event.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import yaml

from services.injector.admission import AdmissionHandler, Answer
from services.injector.server import ServingCertificate, WebhookServer
from services.injector.sources import CertFiles, CertSecret, KubeLookups
from services.injector.values import Values, from_tree
from tulle.errors import UserError
from tulle.metrics import REGISTRY
from tulle.service import Service, run_service

REVIEW_MS = REGISTRY.histogram("tulle_injector_review_duration_ms", "Time to answer one admission review")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default=os.environ.get("TULLE_INJECTOR_LISTEN", "0.0.0.0:8443"),
                   help="HTTPS listen address host:port (default 0.0.0.0:8443)")
    p.add_argument("--tls-cert", metavar="FILE", help="serving certificate (PEM); reloaded when it changes")
    p.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    p.add_argument("--tls-secret", metavar="NS/NAME", help="a kubernetes.io/tls Secret instead of files (--kubernetes)")
    p.add_argument("--values", metavar="FILE", help="install values (YAML/JSON, Linkerd's names)")
    p.add_argument("--trust-anchors", metavar="FILE", help="the trust anchors PEM (else identityTrustAnchorsPEM in --values)")
    p.add_argument("--kubernetes", action="store_true",
                   help="read namespaces' annotations and pods' owners from the Kubernetes API")
    p.add_argument("--max-body-bytes", type=int, default=3 * 1024 * 1024, help="largest review accepted (default 3 MiB)")
    p.add_argument("--manifests", action="append", default=[], help=argparse.SUPPRESS)


def load_values(args, *, need_anchors: bool = True) -> Values:
    values = Values()
    if args.values:
        try:
            tree = yaml.safe_load(open(args.values).read())
        except OSError as e:
            raise UserError(f"--values {args.values}: cannot read: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise UserError(f"--values {args.values}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
        values = from_tree(tree, f"--values {args.values}", values)
    if args.trust_anchors:
        try:
            pem = open(args.trust_anchors).read()
        except OSError as e:
            raise UserError(f"--trust-anchors {args.trust_anchors}: cannot read: {e.strerror or e}") from None
        values = values.with_overrides({"identityTrustAnchorsPEM": pem}, f"--trust-anchors {args.trust_anchors}")
    if need_anchors and not values.trust_anchors_pem:
        raise UserError("give the trust anchors: --trust-anchors FILE or identityTrustAnchorsPEM in --values")
    return values


class Injector:
    def __init__(self, svc: Service):
        args = svc.args
        self.svc = svc
        # Without a serving certificate there is no webhook to run (local mode, where no
        # API server calls it): the service only reports ready and waits.
        self.enabled = bool(args.tls_cert or args.tls_key or args.tls_secret)
        self.values = load_values(args, need_anchors=self.enabled)
        host, sep, port = args.listen.rpartition(":")
        if not sep or not port.isdigit():
            raise UserError(f"--listen: expected host:port, got {args.listen!r}")
        api = None
        if args.kubernetes:
            from kubernetes import client

            from tulle.sources.kube import default_configuration

            api = client.ApiClient(default_configuration())
        if args.tls_secret:
            if api is None:
                raise UserError("--tls-secret needs --kubernetes")
            ns, sep, name = args.tls_secret.partition("/")
            if not sep or not ns or not name:
                raise UserError(f"--tls-secret: expected NAMESPACE/NAME, got {args.tls_secret!r}")
            self.certs = CertSecret(api, ns, name)
        elif not self.enabled:
            self.certs = None
        elif args.tls_cert and args.tls_key:
            for f in (args.tls_cert, args.tls_key):
                if not os.path.isfile(f):
                    raise UserError(f"{f}: no such file (--tls-cert / --tls-key)")
            self.certs = CertFiles(args.tls_cert, args.tls_key)
        else:
            raise UserError("give the serving certificate as both --tls-cert FILE and --tls-key FILE")
        lookups = KubeLookups(api) if api is not None else None
        self.handler = AdmissionHandler(
            self.values,
            **({"namespace_annotations": lookups.namespace_annotations, "owner_of": lookups.owner_of}
               if lookups else {}))
        self.cert = ServingCertificate()
        self.server = WebhookServer(host or "0.0.0.0", int(port), self.cert, self.review,
                                    max_body=args.max_body_bytes)

    async def review(self, body: bytes) -> Answer:
        started = time.perf_counter()
        answer = await asyncio.to_thread(self.handler.handle, body)  # API lookups block
        REVIEW_MS.observe((time.perf_counter() - started) * 1000)
        o = answer.outcome
        if o.result in ("injected", "skipped") and o.resource == "pods":
            data = {"namespace": o.namespace, "pod": o.name, "owner_kind": o.owner_kind, "owner_name": o.owner_name}
            if o.result == "injected":
                data.update(proxy_version=o.proxy_version, replaced_version=o.replaced_version)
                self.svc.log.info("injected", **data)
            else:
                data["reason"] = o.reason
                self.svc.log.info("injection skipped", **data)
            asyncio.ensure_future(self.svc.bus.publish_event(
                "injected" if o.result == "injected" else "injection-skipped", data,
                subject=f"{o.namespace}/{o.name}"))
        return answer

    async def run(self) -> None:
        if self.certs is None:
            self.svc.log.warning("no serving certificate (--tls-cert/--tls-key or --tls-secret): the admission "
                                 "webhook is off")
            await asyncio.Event().wait()
        certs = self.certs.updates()
        first = await certs.__anext__()
        if not self.cert.load(*first, self.certs.where):
            self.svc.log.error("waiting for a valid webhook certificate", where=self.certs.where)
        while self.cert.loaded is None:
            self.cert.load(*(await certs.__anext__()), self.certs.where)
        await self.server.start()
        self.svc.log.info("webhook listening", address=f"{self.server.host}:{self.server.port}")
        try:
            async for pair in certs:
                self.cert.load(*pair, self.certs.where)
        finally:
            await self.server.close()


def entry(argv=None) -> None:
    made: list[Injector] = []

    def prepare(svc: Service) -> None:
        injector = Injector(svc)
        if injector.enabled:
            svc.add_ready_check("certificate loaded", lambda: injector.cert.loaded is not None)
            svc.add_ready_check("webhook listening", lambda: injector.server.listening)
        made.append(injector)

    async def main(svc: Service) -> None:
        await made[0].run()

    run_service("injector", main, argv, add_arguments=add_arguments, prepare=prepare)


if __name__ == "__main__":
    entry()

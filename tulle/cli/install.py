"""`tulle install`, `tulle upgrade`, `tulle uninstall`: manifests for kubectl, rendered
from the bundled Helm charts by the Helm engine, as `linkerd install` does.

    tulle install --crds | kubectl apply -f -
    tulle install | kubectl apply -f -
    tulle upgrade | kubectl apply -f -
    tulle uninstall | kubectl delete -f -
"""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path
from typing import Optional

import click
import yaml

from tulle.errors import UserError

CRDS, CONTROL_PLANE, CNI = "tulle-crds", "tulle-control-plane", "tulle-cni"
DEFAULT_NAMESPACE = "tulle"
CNI_NAMESPACE = "tulle-cni"


def _values_options(f):
    options = [
        click.option("-n", "--namespace", default=DEFAULT_NAMESPACE, show_default=True,
                     help="namespace of the control plane"),
        click.option("-f", "--values", "values_files", multiple=True, metavar="FILE",
                     help="a values file (repeatable; later files win)"),
        click.option("--set", "set_values", multiple=True, metavar="K=V", help="a value, as helm --set (repeatable)"),
        click.option("--set-string", "set_strings", multiple=True, metavar="K=V",
                     help="a value kept as a string, as helm --set-string (repeatable)"),
        click.option("--set-file", "set_files", multiple=True, metavar="K=FILE",
                     help="a value read from a file, as helm --set-file (repeatable)"),
        click.option("--ha", is_flag=True, help="high availability: the chart's values-ha.yaml first"),
        click.option("--cni", is_flag=True,
                     help="pods get their iptables rules from the tulle-cni plugin (its DaemonSet is printed too)"),
        click.option("--crds", is_flag=True, help="print only the CustomResourceDefinitions (apply them first)"),
        click.option("--identity-trust-anchors-file", type=click.Path(dir_okay=False), metavar="FILE",
                     help="PEM trust anchors (identityTrustAnchorsPEM)"),
        click.option("--identity-issuer-certificate-file", type=click.Path(dir_okay=False), metavar="FILE",
                     help="PEM issuer certificate (identity.issuer.tls.crtPEM)"),
        click.option("--identity-issuer-key-file", type=click.Path(dir_okay=False), metavar="FILE",
                     help="PEM issuer private key (identity.issuer.tls.keyPEM)"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def user_values(*, ha: bool, cni: bool, values_files, set_values, set_strings, set_files,
                trust_files: dict[str, Optional[str]]) -> dict:
    """The values a user asked for, in Helm's order: --ha, -f files, --set*, then the flags."""
    import helm_python as helm

    from tulle.install.material import read_pem_file
    from tulle.install.render import chart_values, merge_values

    values: dict = {}
    if ha:
        values = merge_values(values, chart_values(CONTROL_PLANE, "values-ha.yaml"))
    for path in values_files:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise UserError(f"--values {path}: cannot read: {e.strerror}") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark is not None else ""
            raise UserError(f"--values {path}: {where}invalid YAML: {getattr(e, 'problem', None) or e}") from None
        if loaded is None:
            continue
        if not isinstance(loaded, dict):
            raise UserError(f"--values {path}: expected a mapping of values")
        values = merge_values(values, loaded)
    parsers = (("--set", set_values, helm.parse_set_string), ("--set-string", set_strings, helm.parse_set_string_values),
               ("--set-file", set_files, helm.parse_set_file))
    for flag, expressions, parse in parsers:
        for expr in expressions:
            try:
                values = merge_values(values, parse(expr))
            except helm.HelmError as e:
                raise UserError(f"{flag} {expr}: {str(getattr(e, 'detail', '') or e).splitlines()[0]}") from None
    if cni:
        values = merge_values(values, {"cniEnabled": True})
    flags = {"identityTrustAnchorsPEM": ("--identity-trust-anchors-file", trust_files.get("anchors")),
             "crtPEM": ("--identity-issuer-certificate-file", trust_files.get("crt")),
             "keyPEM": ("--identity-issuer-key-file", trust_files.get("key"))}
    for key, (flag, path) in flags.items():
        if path:
            text = read_pem_file(path, flag)
            patch = {key: text} if key == "identityTrustAnchorsPEM" else {"identity": {"issuer": {"tls": {key: text}}}}
            values = merge_values(values, patch)
    return values


def with_defaults(values: dict) -> dict:
    """What the CLI sets unless the user did: the chart makes the namespace (kubectl apply
    has no --create-namespace)."""
    return {"installNamespace": True, **values}


def _render_crds(values: dict) -> list[dict]:
    from tulle.install.render import render

    crd_values = {k: values[k] for k in ("commonLabels",) if k in values}
    return render(CRDS, crd_values, namespace=DEFAULT_NAMESPACE)


def _cni_values(cp: dict) -> dict:
    """The CNI plugin's settings, from the control plane's proxy and proxy-init values."""
    proxy, init = cp.get("proxy", {}), cp.get("proxyInit", {})
    image = proxy.get("image", {})
    return {
        "installNamespace": True,
        "image": {"name": image.get("name") or cp.get("controllerImage"),
                  "version": image.get("version") or cp.get("controllerImageVersion") or "",
                  "pullPolicy": image.get("pullPolicy") or cp.get("imagePullPolicy")},
        "inboundProxyPort": proxy["ports"]["inbound"], "outboundProxyPort": proxy["ports"]["outbound"],
        "proxyAdminPort": proxy["ports"]["admin"], "proxyUID": proxy["uid"],
        "ignoreInboundPorts": init.get("ignoreInboundPorts", ""),
        "ignoreOutboundPorts": init.get("ignoreOutboundPorts", ""),
        "iptablesMode": init.get("iptablesMode", "nft"),
        "imagePullSecrets": cp.get("imagePullSecrets", []),
    }


def _render_all(values: dict, namespace: str, cni: bool) -> list[dict]:
    from tulle.install.render import chart_values, merge_values, render

    objects = []
    if cni:
        effective = merge_values(chart_values(CONTROL_PLANE), values)
        objects += render(CNI, _cni_values(effective), namespace=CNI_NAMESPACE)
    objects += render(CONTROL_PLANE, values, namespace=namespace)
    return objects


# Values whose names end so hold key material or say what it is: never kept in a ConfigMap
# (a caBundle is public, and required with an externally managed webhook Secret).
# Trust and the bus's credentials are read back from their own objects at upgrade; a
# webhook certificate given as values must be given again (else a new one is made).
SECRET_VALUE_SUFFIXES = ("PEM", "Seed", "PublicKey")


def without_secrets(values: dict) -> dict:
    return {k: without_secrets(v) if isinstance(v, dict) else v for k, v in values.items()
            if not (isinstance(k, str) and k.endswith(SECRET_VALUE_SUFFIXES))}


def _install_values_config_map(values: dict, namespace: str, labels: dict) -> dict:
    """The values this installation was made with, for the next `tulle upgrade` to start
    from (Helm keeps a release's values in the cluster for --reuse-values; kubectl apply
    keeps nothing)."""
    from tulle.install.cluster import INSTALL_VALUES, INSTALL_VALUES_KEY

    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": INSTALL_VALUES, "namespace": namespace, "labels": dict(labels)},
            "data": {INSTALL_VALUES_KEY: yaml.safe_dump(without_secrets(values), sort_keys=True)}}


def _control_plane(user: dict, values: dict, namespace: str, cni: bool) -> list[dict]:
    """Every object of the installation: the charts rendered with `values` (the user's,
    completed), and the user's own values remembered beside the chart's configuration,
    labelled as it is (the webhook stays last: created once its injector is)."""
    objects = _render_all(values, namespace, cni)
    at = next(i for i, o in enumerate(objects) if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "tulle-config")
    remembered = _install_values_config_map(user, namespace, objects[at]["metadata"].get("labels", {}))
    return objects[:at + 1] + [remembered] + objects[at + 1:]


def _header(verb: str, namespace: str) -> str:
    from tulle import __version__

    return f"Tulle {__version__}: {verb} for namespace {namespace}, for `kubectl apply -f -`"


@click.command()
@_values_options
@click.option("--trust-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="where generated trust anchors and issuer are saved (default: a new folder under "
                   "~/.local/share/tulle/trust)")
def install(namespace, values_files, set_values, set_strings, set_files, ha, cni, crds,
            identity_trust_anchors_file, identity_issuer_certificate_file, identity_issuer_key_file, trust_dir):
    """Print the manifests of a Tulle installation, for `kubectl apply -f -`.

    First the CRDs (`tulle install --crds | kubectl apply -f -`), then the control
    plane (`tulle install | kubectl apply -f -`). Without trust anchors and an issuer
    (values or --identity-* files), new ones are generated and saved (see stderr).
    """
    from tulle.install.render import chart_values
    from tulle.install.values import complete

    values = user_values(ha=ha, cni=cni, values_files=values_files, set_values=set_values, set_strings=set_strings,
                         set_files=set_files, trust_files={"anchors": identity_trust_anchors_file,
                                                           "crt": identity_issuer_certificate_file,
                                                           "key": identity_issuer_key_file})
    if crds:
        click.echo(_to_yaml(_render_crds(values), _header("CustomResourceDefinitions", namespace)), nl=False)
        return
    values = with_defaults(values)
    done = complete(copy.deepcopy(values), chart_values(CONTROL_PLANE), namespace=namespace)
    objects = _control_plane(values, done.values, namespace, cni)  # before saving anything: bad values fail first
    if done.generated_trust is not None:
        from tulle.install.material import LIFETIME, default_trust_dir, write_trust_dir

        where = write_trust_dir(Path(trust_dir) if trust_dir else default_trust_dir(namespace), done.trust,
                                done.generated_trust)
        click.echo(f"tulle: generated trust anchors and an identity issuer (valid {LIFETIME.days} days); "
                   f"saved to {where} (trust-anchor.key signs new issuers: keep it safe)", err=True)
    for what in done.generated:
        click.echo(f"tulle: generated {what}", err=True)
    click.echo(_to_yaml(objects, _header("install", namespace)), nl=False)


@click.command()
@_values_options
@click.option("--kubeconfig", type=click.Path(dir_okay=False), metavar="FILE",
              help="kubeconfig to read the installed trust from (default: KUBECONFIG, ~/.kube/config, in-cluster)")
@click.option("--context", "kube_context", metavar="NAME", help="kubeconfig context")
@click.option("--reset-values", is_flag=True,
              help="start from the chart's defaults, not from the values the installation was made with")
def upgrade(namespace, values_files, set_values, set_strings, set_files, ha, cni, crds,
            identity_trust_anchors_file, identity_issuer_certificate_file, identity_issuer_key_file,
            kubeconfig, kube_context, reset_values):
    """Print the manifests of the installed control plane at this version, keeping its
    trust anchors, issuer and bus credentials (read from the cluster, or given as files).

    The values it was installed or last upgraded with (ConfigMap tulle-install-values) are
    kept; -f / --set / --ha / --cni given now go on top of them. --reset-values starts from
    the chart's defaults instead. Values holding key material are never kept: give a
    webhook certificate again, or a new one is made.
    """
    from tulle.install.cluster import read_existing
    from tulle.install.material import RENEW_WARNING
    from tulle.install.render import chart_values, merge_values
    from tulle.install.values import complete

    values = user_values(ha=ha, cni=cni, values_files=values_files, set_values=set_values, set_strings=set_strings,
                         set_files=set_files, trust_files={"anchors": identity_trust_anchors_file,
                                                           "crt": identity_issuer_certificate_file,
                                                           "key": identity_issuer_key_file})
    if crds:
        click.echo(_to_yaml(_render_crds(values), _header("CustomResourceDefinitions", namespace)), nl=False)
        return
    given = identity_trust_anchors_file and identity_issuer_certificate_file and identity_issuer_key_file
    existing = read_existing(namespace, kubeconfig=kubeconfig, context=kube_context, need_trust=not given,
                             with_values=not reset_values)
    if existing.install_values is not None:  # as Helm's --reuse-values: what is given now goes on top
        values = merge_values(existing.install_values, values)
    values = with_defaults(values)
    cni = cni or values.get("cniEnabled") is True
    done = complete(copy.deepcopy(values), chart_values(CONTROL_PLANE), namespace=namespace, existing=existing,
                    may_generate_trust=False,
                    trust_source=f"ConfigMap {namespace}/tulle-identity-trust-roots not found")
    objects = _control_plane(values, done.values, namespace, cni)
    if done.kept_nats_tls is not None:
        left = done.kept_nats_tls.not_after() - dt.datetime.now(dt.timezone.utc)
        if left < RENEW_WARNING:
            click.echo(f"tulle: warning: the NATS certificate expires in {max(left.days, 0)} days; delete Secret "
                       f"{namespace}/tulle-nats-tls and upgrade again to renew it (then restart meshed pods)", err=True)
    for what in done.generated:
        click.echo(f"tulle: generated {what} (none found in namespace {namespace})", err=True)
    click.echo(_to_yaml(objects, _header("upgrade", namespace)), nl=False)


@click.command()
@click.option("-n", "--namespace", default=DEFAULT_NAMESPACE, show_default=True,
              help="namespace of the control plane")
@click.option("--cni", is_flag=True, help="also the tulle-cni DaemonSet and its namespace")
def uninstall(namespace, cni):
    """Print every object a Tulle installation made, for `kubectl delete -f -`:
    the control plane, its namespace and the CRDs (with every ServiceProfile, Server and
    ServerAuthorization). Remove the proxies first by restarting meshed workloads
    without injection, or they lose their control plane.
    """
    from tulle.install.render import chart_values, object_heads
    from tulle.install.values import complete

    # Placeholder secrets: what to delete does not depend on them.
    done = complete({"installNamespace": True, "cniEnabled": cni}, chart_values(CONTROL_PLANE), namespace=namespace)
    objects = _render_crds({}) + _control_plane({}, done.values, namespace, cni)
    heads = object_heads(reversed(objects))  # webhooks first, the namespace and CRDs last
    heads.sort(key=lambda h: h["kind"] in ("Namespace", "CustomResourceDefinition"))
    click.echo(_to_yaml(heads, f"Tulle: uninstall from namespace {namespace}, for `kubectl delete -f -`"), nl=False)


def _to_yaml(objects, header: str) -> str:
    from tulle.install.render import to_yaml

    return to_yaml(objects, header)

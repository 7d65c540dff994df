"""The bundled Helm charts, rendered by the real Helm engine (Helm v4 through
helm-python-sdk): what `tulle install` prints is what `helm install` would apply.

    objects = render("tulle-control-plane", values, namespace="tulle")
    print(to_yaml(objects))

Values errors come back as one line naming the value (Helm's schema message), template
errors as the template's own `required`/`fail` message.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from tulle.errors import UserError

# In a checkout a symlink to deploy/charts; in an installed wheel, the charts themselves.
CHARTS_DIR = Path(__file__).resolve().parent / "charts"
CHARTS = ("tulle-crds", "tulle-control-plane", "tulle-cni")

# Helm's install order (pkg/release/util/kind_sorter.go): what others depend on comes first.
INSTALL_ORDER = [
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange", "PodSecurityPolicy",
    "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList", "ConfigMap", "StorageClass",
    "PersistentVolume", "PersistentVolumeClaim", "CustomResourceDefinition", "ClusterRole",
    "ClusterRoleList", "ClusterRoleBinding", "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding",
    "RoleBindingList", "Service", "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress", "APIService",
    "MutatingWebhookConfiguration", "ValidatingWebhookConfiguration",
]


class ChartError(UserError):
    """The chart refused the values, or a template failed."""


def chart_dir(name: str) -> Path:
    path = CHARTS_DIR / name
    if not (path / "Chart.yaml").is_file():
        raise RuntimeError(f"the {name} chart is missing from this installation ({path})")
    return path


def _helm():
    import helm_python

    return helm_python


def merge_values(base: dict, override: dict) -> dict:
    """Helm's coalescing of two value trees: maps merge key by key, anything else is
    replaced, and null removes a key."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_values(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def chart_values(name: str, extra_file: Optional[str] = None) -> dict:
    """A chart's values.yaml (or another values file shipped with it, e.g. values-ha.yaml)."""
    path = chart_dir(name) / (extra_file or "values.yaml")
    return yaml.safe_load(path.read_text()) or {}


_SCHEMA_LINE = re.compile(r"^- (.*)$")
_EXEC_ERROR = re.compile(r"^execution error at \([^)]*\): ")


def _one_line(chart: str, e: Exception) -> str:
    text = str(getattr(e, "detail", None) or e).strip()
    if "don't meet the specifications of the schema" in text:
        problems = [m.group(1).strip() for line in text.splitlines() if (m := _SCHEMA_LINE.match(line.strip()))]
        return f"{chart} values: " + "; ".join(problems or [text.splitlines()[-1]])
    first = text.splitlines()[0] if text else type(e).__name__
    return _EXEC_ERROR.sub("", first)


def render(name: str, values: dict, *, namespace: str, release: Optional[str] = None) -> list[dict]:
    """Render one bundled chart; the objects in the order `kubectl apply` should create them."""
    helm = _helm()
    with helm.Chart.load(str(chart_dir(name))) as chart:
        try:
            rendered = chart.render(values, name=release or name, namespace=namespace, is_install=True)
        except (helm.HelmValuesError, helm.HelmRenderError) as e:
            raise ChartError(_one_line(name, e)) from None
    objects = []
    for template in sorted(rendered):
        if not template.endswith((".yaml", ".yml")):
            continue  # NOTES.txt and the like
        for doc in yaml.safe_load_all(rendered[template]):
            if doc:
                objects.append(doc)
    return sort_for_apply(objects)


def sort_for_apply(objects: Iterable[dict]) -> list[dict]:
    rank = {kind: i for i, kind in enumerate(INSTALL_ORDER)}
    return sorted(objects, key=lambda o: rank.get(o.get("kind", ""), len(rank)))  # stable: template order within a kind


def lint(name: str, values: Optional[dict] = None) -> list[dict[str, Any]]:
    """Helm lint's findings for a bundled chart (empty when clean)."""
    report = _helm().lint(str(chart_dir(name)), values)
    return report.get("messages", [])


class _BlockDumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str):
    # Multi-line strings (PEM, configuration files) as readable literal blocks.
    style = "|" if "\n" in value and not value.endswith((" ", "\t")) and "\t" not in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str)


def to_yaml(objects: Iterable[dict], header: str = "") -> str:
    parts = [f"# {line}".rstrip() for line in header.splitlines()] if header else []
    for obj in objects:
        parts.append("---")
        parts.append(yaml.dump(obj, Dumper=_BlockDumper, sort_keys=False, width=120).rstrip("\n"))
    return "\n".join(parts) + "\n"


def object_heads(objects: Iterable[dict]) -> list[dict]:
    """apiVersion, kind and name of each object: all `kubectl delete -f` needs."""
    heads = []
    for o in objects:
        meta = {"name": o["metadata"]["name"]}
        if o["metadata"].get("namespace"):
            meta["namespace"] = o["metadata"]["namespace"]
        heads.append({"apiVersion": o["apiVersion"], "kind": o["kind"], "metadata": meta})
    return heads

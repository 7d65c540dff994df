"""`tulle inject` / `tulle uninject`: add the proxy to manifests, or take it out.

Reads files, folders (every .yaml, .yml and .json below them) or stdin (`-`), YAML or
JSON, multi-document and `List`; writes the result to stdout, ready for
`kubectl apply -f -`, and one report line per object to stderr. A document nothing
happened to is written back exactly as it was read (comments included); a changed one
keeps its key order and every field it had. The decisions and the patch come from
services/injector, the code the admission webhook runs.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import click
import yaml

from tulle.errors import UserError

_SEPARATOR = re.compile(r"^---(\s.*)?$")


# --- YAML that keeps what it read ---------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """YAML as Kubernetes reads it, except that timestamps stay strings (written back as read)."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, regexp) for tag, regexp in v if tag != "tag:yaml.org,2002:timestamp"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.copy().items()
}


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str):
    # Multi-line strings (PEM bundles, scripts) as literal blocks, as kubectl writes them.
    style = "|" if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(obj: Any) -> str:
    # PyYAML's default line width (80) is go-yaml's, which kubectl writes with: long strings
    # fold where kubectl folds them, so a manifest it made comes back byte for byte.
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)


# --- reading ---------------------------------------------------------------------------------------


@dataclass
class Doc:
    text: str  # as read, including its trailing newline
    obj: Any  # parsed; None for an empty document
    fmt: str  # "yaml" | "json"
    where: str  # file and document number, for messages


@dataclass
class Source:
    name: str
    parts: list  # Doc or str (a `---` line kept as read)


def _read_text(path: str) -> tuple[str, str]:
    if path == "-":
        return "stdin", sys.stdin.read()
    try:
        return path, Path(path).read_text()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read: {e.strerror or e}") from None


def _files(paths: Iterable[str]) -> list[str]:
    out = []
    for p in paths:
        if p == "-":
            out.append(p)
            continue
        path = Path(p)
        if path.is_dir():
            found = sorted(str(f) for f in path.rglob("*") if f.is_file() and f.suffix in (".yaml", ".yml", ".json"))
            out += found
        elif path.exists():
            out.append(p)
        else:
            raise UserError(f"{p}: no such file or folder")
    return out


def parse_source(name: str, text: str) -> Source:
    if text.lstrip().startswith(("{", "[")):
        decoder, pos, parts, n = json.JSONDecoder(), 0, [], 0
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text):
                break
            n += 1
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise UserError(f"{name}: document {n}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
            end_line = text.find("\n", end)
            end = len(text) if end_line < 0 else end_line + 1
            parts.append(Doc(text[pos:end], obj, "json", f"{name}: document {n}"))
            pos = end
        return Source(name, parts)
    parts: list = []
    current: list[str] = []
    n = 0

    def close() -> None:
        nonlocal n
        chunk = "".join(current)
        current.clear()
        if not chunk and parts and isinstance(parts[-1], str):
            parts.append(Doc("", None, "yaml", ""))
            return
        if not chunk and not parts:
            return
        n += 1
        where = f"{name}: document {n}"
        try:
            obj = yaml.load(chunk, Loader=_Loader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" (line {mark.line + 1})" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise UserError(f"{where}: not valid YAML: {problem}{at}") from None
        parts.append(Doc(chunk, obj, "yaml", where))

    for line in text.splitlines(keepends=True):
        if _SEPARATOR.match(line.rstrip("\r\n")):
            close()
            parts.append(line)
        else:
            current.append(line)
    if current or (parts and isinstance(parts[-1], str)):
        close()
    return Source(name, parts)


def _json_indent(text: str) -> int:
    for line in text.splitlines()[1:]:
        stripped = line.lstrip(" ")
        if stripped:
            return max(len(line) - len(stripped), 1)
    return 2


def render(doc: Doc, new: Any, changed: bool, output: str) -> str:
    fmt = output or doc.fmt
    if not changed and fmt == doc.fmt:
        return doc.text
    if fmt == "json":
        return json.dumps(new, indent=_json_indent(doc.text) if doc.fmt == "json" else 2, ensure_ascii=False) + "\n"
    return dump_yaml(new)


def transform(paths: tuple[str, ...], output: str, fn: Callable[[Any, str], tuple[Any, bool, list[str]]]) -> None:
    """Read every source, run `fn` on each object, write the stream and the report."""
    sources = [parse_source(*_read_text(p)) for p in _files(paths or ("-",))]
    out: list[str] = []
    report: list[str] = []
    # A YAML stream separates every source's documents with `---` (JSON is YAML too);
    # only an all-JSON stream is plain concatenated JSON.
    all_json = all(isinstance(p, str) or p.fmt == "json" for src in sources for p in src.parts)
    stream = output or ("json" if all_json else "yaml")
    for i, src in enumerate(sources):
        if i and out and stream == "yaml":
            if not out[-1].endswith("\n"):
                out.append("\n")
            if not (src.parts and isinstance(src.parts[0], str)):
                out.append("---\n")
        for part in src.parts:
            if isinstance(part, str):
                out.append(part if output != "json" else "")
                continue
            if part.obj is None:
                out.append(part.text if output != "json" else "")
                continue
            new, changed, lines = fn(part.obj, part.where)
            report += lines
            out.append(render(part, new, changed, output))
    sys.stdout.write("".join(out))
    sys.stdout.flush()
    for line in report:
        click.echo(line, err=True)


# --- values ---------------------------------------------------------------------------------------


def load_values(values_file: str, sets: tuple[str, ...], trust_anchors: str):
    from services.injector.values import Values, from_tree

    values = Values()
    if values_file:
        name, text = _read_text(values_file)
        try:
            tree = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as e:
            raise UserError(f"--values {name}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
        values = from_tree(tree, f"--values {name}", values)
    pairs = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. proxy.nativeSidecar=false")
        pairs[key] = value
    if pairs:
        values = values.with_overrides(pairs, "--set")
    if trust_anchors:
        name, text = _read_text(trust_anchors)
        values = values.with_overrides({"identityTrustAnchorsPEM": text}, f"--trust-anchors {name}")
    return values


_OUTPUT = click.Choice(["yaml", "json"])


@click.command("inject")
@click.argument("paths", nargs=-1)
@click.option("--manual", is_flag=True, help="render the proxy into the manifest instead of only the inject annotation")
@click.option("--ingress", is_flag=True, help="tulle.dev/inject: ingress (for ingress controllers)")
@click.option("--values", "values_file", default="", metavar="FILE",
              help="install values (YAML or JSON, Linkerd's names: proxy.image.version, proxyInit.iptablesMode ...)")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="one value, e.g. proxy.nativeSidecar=false")
@click.option("--trust-anchors", default="", metavar="FILE",
              help="the installation's trust anchors (PEM), needed by --manual")
@click.option("--annotation", "annotations", multiple=True, metavar="KEY=VALUE",
              help="a config.tulle.dev/* annotation to set on each pod template, e.g. proxy-cpu-request=200m")
@click.option("-o", "--output", type=_OUTPUT, default=None, help="output format (default: as read)")
def inject(paths, manual, ingress, values_file, sets, trust_anchors, annotations, output):
    """Add the Tulle proxy to Kubernetes manifests (files, folders or - for stdin).

    By default only the `tulle.dev/inject: enabled` annotation is added to each pod
    template, and the admission webhook adds the proxy when the pods are created;
    --manual writes the proxy in the manifest with the webhook's own code.

        kubectl get deploy -o yaml | tulle inject - | kubectl apply -f -
    """
    from services.injector import manifests

    values = load_values(values_file, sets, trust_anchors)
    if manual and not values.trust_anchors_pem:
        raise UserError("--manual needs the installation's trust anchors: --trust-anchors FILE "
                        "(the ca.crt of `tulle identity init`) or identityTrustAnchorsPEM in --values")
    extra = {}
    for item in annotations:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--annotation {item!r}: expected KEY=VALUE, e.g. proxy-cpu-request=200m")
        extra[key if key.startswith("config.tulle.dev/") else f"config.tulle.dev/{key}"] = value
    opts = manifests.Options(manual=manual, ingress=ingress, annotations=extra)

    def fn(obj, where):
        out = manifests.inject_object(obj, values, opts)
        return out.obj, out.changed, out.lines

    transform(paths, output, fn)


@click.command("uninject")
@click.argument("paths", nargs=-1)
@click.option("-o", "--output", type=_OUTPUT, default=None, help="output format (default: as read)")
def uninject(paths, output):
    """Remove everything `tulle inject` or the webhook added (but `tulle.dev/inject:
    disabled`) from Kubernetes manifests (files, folders or - for stdin)."""
    from services.injector import manifests
    from services.injector.values import Values

    def fn(obj, where):
        out = manifests.uninject_object(obj, Values())
        return out.obj, out.changed, out.lines

    transform(paths, output, fn)

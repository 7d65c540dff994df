"""Check custom resources against the CustomResourceDefinitions we ship, as the API server
would: kubernetes-validate knows only built-in kinds, so for ours this module applies the
CRD's openAPIV3Schema (with jsonschema) and then its x-kubernetes-validations rules (with
cel-python, plus the Kubernetes CEL functions our rules use).

What it reproduces of the API server, and only that:
- null fields are dropped first (structural schemas prune them);
- unknown fields are refused (kubectl's default `--validate=strict`);
- `x-kubernetes-int-or-string` accepts an integer or a string;
- `x-kubernetes-list-type: map` refuses two items with the same keys;
- each CEL rule runs with `self` bound to its node, on objects that passed the schema;
- CEL `duration()` reads Go durations; `isCIDR`, `cidr(...).containsCIDR(...)` as the
  Kubernetes CIDR library (1.31+).

    v = CRDValidator.from_documents(rendered_crds)
    v.errors(obj)  -> ["spec.client: set exactly one of meshTLS or unauthenticated: true", ...]
"""

from __future__ import annotations

import copy
import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import celpy
import jsonschema
from celpy import celtypes

# --- the Kubernetes CEL functions our rules use -----------------------------------------------

_GO_DURATION = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "μs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
            "m": 60_000_000_000, "h": 3_600_000_000_000}


def go_duration_ns(text: str) -> int:
    """Go's time.ParseDuration, which Kubernetes' CEL duration() uses."""
    s, sign = text, 1
    if s[:1] in "+-":
        sign, s = (-1 if s[0] == "-" else 1), s[1:]
    if s == "0":
        return 0
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    total, pos = 0.0, 0
    for m in _GO_DURATION.finditer(s):
        if m.start() != pos or m.group(1) in ("", "."):
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNIT_NS[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise ValueError(f"invalid duration {text!r}")
    return sign * int(total)


def _duration(value):
    if isinstance(value, celtypes.DurationType):
        return value
    ns = go_duration_ns(str(value))
    return celtypes.DurationType(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


class _CIDR:
    def __init__(self, net):
        self.net = net


def _parse_cidr(text: str):
    # netip.ParsePrefix: an address, '/', a prefix length; host bits may be set.
    if "/" not in text:
        raise ValueError(f"{text!r} is not a CIDR")
    return ipaddress.ip_network(text, strict=False)


def _is_cidr(value):
    try:
        _parse_cidr(str(value))
        return celtypes.BoolType(True)
    except ValueError:
        return celtypes.BoolType(False)


def _cidr(value):
    return _CIDR(_parse_cidr(str(value)))


def _contains_cidr(outer, inner):
    other = inner.net if isinstance(inner, _CIDR) else _parse_cidr(str(inner))
    return celtypes.BoolType(outer.net.version == other.version and other.subnet_of(outer.net))


CEL_FUNCTIONS = {"duration": _duration, "isCIDR": _is_cidr, "cidr": _cidr, "containsCIDR": _contains_cidr}

_ENV = celpy.Environment()


def compile_rule(rule: str):
    return _ENV.program(_ENV.compile(rule), functions=CEL_FUNCTIONS)


# --- schemas ------------------------------------------------------------------------------------


def _json_schema(node: dict, *, root: bool = False) -> dict:
    """An OpenAPI v3 structural schema as a JSON Schema with strict unknown-field handling."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("description", "default", "x-kubernetes-validations", "x-kubernetes-list-type",
                   "x-kubernetes-list-map-keys", "x-kubernetes-preserve-unknown-fields", "nullable",
                   "x-kubernetes-int-or-string", "x-kubernetes-embedded-resource"):
            continue
        if key == "properties":
            out["properties"] = {k: _json_schema(v) for k, v in value.items()}
        elif key == "items":
            out["items"] = _json_schema(value)
        elif key == "additionalProperties" and isinstance(value, dict):
            out["additionalProperties"] = _json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_json_schema(v) for v in value]
        elif key == "not":
            out["not"] = _json_schema(value)
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if root:
        out["$schema"] = "http://json-schema.org/draft-07/schema#"
    return out


def _prune_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _prune_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_prune_nulls(v) for v in value]
    return value


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(object)"


@dataclass
class _Version:
    schema: dict  # openAPIV3Schema
    validator: jsonschema.Draft7Validator


class CRDValidator:
    def __init__(self, crds: Iterable[dict]):
        self.versions: dict[tuple[str, str], _Version] = {}
        self._rules: dict[str, Any] = {}
        for crd in crds:
            spec = crd["spec"]
            for v in spec["versions"]:
                if not v.get("served"):
                    continue
                schema = v["schema"]["openAPIV3Schema"]
                js = _json_schema(schema, root=True)
                jsonschema.Draft7Validator.check_schema(js)
                self.versions[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = _Version(
                    schema, jsonschema.Draft7Validator(js))
                for rule in self.rules(schema):
                    self._rule(rule)  # every rule compiles, or the CRD is broken

    @classmethod
    def from_documents(cls, docs: Iterable[dict]) -> "CRDValidator":
        return cls(d for d in docs if d and d.get("kind") == "CustomResourceDefinition")

    def serves(self, obj: dict) -> bool:
        return (obj.get("apiVersion"), obj.get("kind")) in self.versions

    @staticmethod
    def rules(schema: dict) -> Iterator[str]:
        for rule in schema.get("x-kubernetes-validations", ()):
            yield rule["rule"]
        for sub in schema.get("properties", {}).values():
            yield from CRDValidator.rules(sub)
        for key in ("items", "additionalProperties"):
            if isinstance(schema.get(key), dict):
                yield from CRDValidator.rules(schema[key])

    def _rule(self, rule: str):
        if rule not in self._rules:
            self._rules[rule] = compile_rule(rule)
        return self._rules[rule]

    def errors(self, obj: dict) -> list[str]:
        """Why the API server would refuse `obj` (empty when it would accept it)."""
        version = self.versions.get((obj.get("apiVersion"), obj.get("kind")))
        if version is None:
            return [f"no CRD serves {obj.get('apiVersion')} {obj.get('kind')}"]
        obj = _prune_nulls(copy.deepcopy(obj))
        found = [f"{_path(e.absolute_path)}: {e.message}"
                 for e in sorted(version.validator.iter_errors(obj), key=lambda e: list(map(str, e.path)))]
        if found:
            return found
        return list(self._walk(version.schema, obj, []))

    def _walk(self, schema: dict, value: Any, path: list) -> Iterator[str]:
        if schema.get("x-kubernetes-list-type") == "map" and isinstance(value, list):
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen = set()
            for i, item in enumerate(value):
                k = tuple(item.get(key) for key in keys)
                if k in seen:
                    yield f"{_path(path + [i])}: Duplicate value: {dict(zip(keys, k))}"
                seen.add(k)
        for rule in schema.get("x-kubernetes-validations", ()):
            try:
                ok = self._rule(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)})
            except Exception as e:  # an evaluation error refuses the object, as on the API server
                ok = False
                rule = {**rule, "message": f"{rule.get('message', rule['rule'])} (evaluation error: {e})"}
            if isinstance(ok, Exception) or not ok:
                yield f"{_path(path)}: {rule.get('message', rule['rule'])}"
        if isinstance(value, dict):
            props = schema.get("properties", {})
            extra = schema.get("additionalProperties")
            for k, v in value.items():
                sub = props.get(k) if k in props else (extra if isinstance(extra, dict) else None)
                if sub is not None:
                    yield from self._walk(sub, v, path + [k])
        elif isinstance(value, list) and isinstance(schema.get("items"), dict):
            for i, item in enumerate(value):
                yield from self._walk(schema["items"], item, path + [i])


def is_structural(schema: dict, path: str = "") -> list[str]:
    """Nodes of a CRD schema without a type (Kubernetes requires one, except int-or-string
    and preserve-unknown-fields nodes)."""
    missing = []
    if "type" not in schema and not schema.get("x-kubernetes-int-or-string") \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        missing.append(path or "(root)")
    for k, sub in schema.get("properties", {}).items():
        missing += is_structural(sub, f"{path}.{k}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            missing += is_structural(schema[key], f"{path}[{key}]")
    return missing

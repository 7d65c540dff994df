"""Strict, typed decoding of JSON bus messages into dataclasses.

Every bus message is a dataclass in `tulle.schemas`. Writers call `encode`, readers
call `decode`; both use the same class, so the two ends cannot drift apart. `decode`
never lets a malformed payload through: anything unexpected becomes a `DecodeError`
whose `reason` is one of a small fixed set, suitable as a metrics label.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import orjson

T = TypeVar("T")

# A JSON key that is a Python keyword is written with a trailing underscore in the
# dataclass (`except_`), and without it on the wire.
_KEYWORD_FIELDS = {"except_": "except", "not_": "not", "all_": "all", "any_": "any"}


class DecodeError(ValueError):
    """A bus message that does not match its schema.

    reason: "malformed" (not JSON), "not-object", "version" (missing or unsupported
    `v`), "field" (missing, unknown-typed or wrongly typed field).
    """

    def __init__(self, reason: str, detail: str, schema: str = ""):
        super().__init__(f"{schema or 'message'}: {reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.schema = schema


def wire_name(field_name: str) -> str:
    return _KEYWORD_FIELDS.get(field_name, field_name)


# As deep as a manifest may nest (tulle/resources/parse.py MAX_DEPTH), so whatever a service
# compiles from one decodes; a payload nested
# further is refused before the decoder's recursion could reach Python's limit.
MAX_DEPTH = 64

_hints_cache: dict[type, list[tuple[str, str, Any, bool]]] = {}


def _fields(cls: type) -> list[tuple[str, str, Any, bool]]:
    """(python name, wire name, type, required) for each field of a dataclass."""
    cached = _hints_cache.get(cls)
    if cached is None:
        hints = get_type_hints(cls)
        cached = []
        for f in dataclasses.fields(cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            cached.append((f.name, wire_name(f.name), hints[f.name], required))
        _hints_cache[cls] = cached
    return cached


def _convert(value: Any, tp: Any, path: str, depth: int = 0) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if tp is dict or tp is list:
        if not isinstance(value, tp):
            raise DecodeError("field", f"{path}: expected {'an object' if tp is dict else 'a list'}, got {type(value).__name__}")
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise DecodeError("field", f"{path}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path, depth)
            except DecodeError as e:
                errors.append(e.detail)
        raise DecodeError("field", "; ".join(errors) or f"{path}: unexpected null")
    if origin is list:
        if not isinstance(value, list):
            raise DecodeError("field", f"{path}: expected a list, got {type(value).__name__}")
        (item,) = get_args(tp)
        return [_convert(v, item, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise DecodeError("field", f"{path}: expected an object, got {type(value).__name__}")
        _, vt = get_args(tp)
        return {k: _convert(v, vt, f"{path}.{k}", depth + 1) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, depth + 1)
    if tp is bool:
        if not isinstance(value, bool):
            raise DecodeError("field", f"{path}: expected a boolean, got {type(value).__name__}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise DecodeError("field", f"{path}: expected an integer, got {type(value).__name__}")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise DecodeError("field", f"{path}: expected a number, got {type(value).__name__}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise DecodeError("field", f"{path}: expected a string, got {type(value).__name__}")
        return value
    raise DecodeError("field", f"{path}: no decoder for type {tp!r}")


def _build(cls: type[T], obj: Any, path: str, depth: int = 0) -> T:
    if depth > MAX_DEPTH:
        raise DecodeError("field", f"{path}: nested deeper than {MAX_DEPTH} levels")
    if not isinstance(obj, dict):
        raise DecodeError("not-object" if not path else "field",
                          f"{path or 'message'}: expected an object, got {type(obj).__name__}")
    kwargs = {}
    for name, wire, tp, required in _fields(cls):
        if wire in obj:
            kwargs[name] = _convert(obj[wire], tp, f"{path}.{wire}" if path else wire, depth)
        elif required:
            raise DecodeError("field", f"{path}.{wire}: missing" if path else f"{wire}: missing")
    # Unknown fields are ignored on purpose: a newer writer may add optional fields
    # within the same schema version without breaking older readers.
    return cls(**kwargs)


def decode(cls: type[T], payload: bytes | str) -> T:
    """Decode one bus message into `cls`, or raise DecodeError."""
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as e:
        raise DecodeError("malformed", str(e), cls.__name__) from None
    if not isinstance(obj, dict):
        raise DecodeError("not-object", f"got {type(obj).__name__}", cls.__name__)
    expected = getattr(cls, "VERSION", None)
    if expected is not None:
        v = obj.get("v")
        if v != expected or isinstance(v, bool):
            raise DecodeError("version", f"v={v!r}, this reader understands v={expected}", cls.__name__)
    try:
        return _build(cls, obj, "")
    except DecodeError as e:
        raise DecodeError(e.reason, e.detail, cls.__name__) from None


def to_jsonable(msg: Any) -> Any:
    """A dataclass as plain JSON-ready data, with wire names."""
    if dataclasses.is_dataclass(msg):
        return {wire_name(f.name): to_jsonable(getattr(msg, f.name)) for f in dataclasses.fields(msg)}
    if isinstance(msg, list):
        return [to_jsonable(v) for v in msg]
    if isinstance(msg, dict):
        return {k: to_jsonable(v) for k, v in msg.items()}
    return msg


def encode(msg: Any) -> bytes:
    """Encode one bus message (a dataclass from tulle.schemas) as JSON bytes."""
    return orjson.dumps(to_jsonable(msg), option=orjson.OPT_SORT_KEYS)

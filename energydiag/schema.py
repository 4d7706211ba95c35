"""Typed reports: what one layer hands the next, and what ``--json`` prints.

A report is a dataclass of data (numbers, strings, lists, dicts and other such dataclasses), so
its JSON is derived from its fields rather than written by hand, and it reads back into the same
type. Three class-level declarations shape the JSON without a hand-written ``to_dict``:
``derived`` names properties that are written out and recomputed on reading, ``flattened`` names
a dataclass field whose fields are written inline (the parent's keys are its keys), and the
``@report(kind)`` decorator gives a top-level report its type tag, refusing a tag used twice.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union

R = TypeVar("R", bound="Report")

REPORTS: dict[str, type[Report]] = {}
NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class SchemaError(ValueError):
    """JSON that does not fit the report type it claims to be."""


class Record:
    """A dataclass whose JSON is its fields (plus ``derived``, with ``flattened`` fields inline)."""

    derived: ClassVar[tuple[str, ...]] = ()
    flattened: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        return encode(self)

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        return decode(cls, data)


class Report(Record):
    """A top-level report: a command's result, tagged with its type in JSON."""

    kind: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        return {"type": self.kind, **self.to_dict()}

    @classmethod
    def from_json(cls: type[R], data: dict[str, Any]) -> R:
        if data.get("type") != cls.kind:
            raise SchemaError(f"expected a {cls.kind!r} report, got type {data.get('type')!r}")
        return decode(cls, {k: v for k, v in data.items() if k != "type"})


def report(kind: str) -> typing.Callable[[type[R]], type[R]]:
    """Register a report type under its JSON tag; a tag registered twice is a bug."""

    def register(cls: type[R]) -> type[R]:
        if kind in REPORTS:
            raise ValueError(f"report type {kind!r} is registered twice")
        cls.kind = kind
        REPORTS[kind] = cls
        return cls

    return register


def load(data: dict[str, Any]) -> Report:
    """Any tagged report, read back into its type."""
    cls = REPORTS.get(data.get("type", ""))
    if cls is None:
        raise SchemaError(f"unknown report type {data.get('type')!r}")
    return cls.from_json(data)


# --- writing -----------------------------------------------------------------------------------


def encode(value: Any) -> Any:
    """Plain JSON-able data; non-finite floats stay floats (the JSON writer spells them)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _encode_fields(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return value.item()
    return value


def _encode_fields(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = encode(getattr(obj, f.name))
        if f.name in getattr(obj, "flattened", ()):
            out |= value
        else:
            out[f.name] = value
    for name in getattr(obj, "derived", ()):
        out[name] = encode(getattr(obj, name))
    return out


# --- reading -----------------------------------------------------------------------------------


def decode(hint: Any, value: Any) -> Any:
    """``value`` (parsed JSON) as the type ``hint`` describes."""
    if hint is Any or hint is typing.Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return _decode_union(typing.get_args(hint), value)
    if dataclasses.is_dataclass(hint):
        return _decode_dataclass(hint, value)
    if origin in (list, tuple, dict):
        return _decode_container(origin, typing.get_args(hint), value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value)
    if hint is float:
        return _decode_float(value)
    if hint in (int, str, bool) and not isinstance(value, hint):
        raise SchemaError(f"expected {hint.__name__}, got {value!r}")
    if hint is Path:
        return Path(value)
    return value


def _decode_union(options: tuple[Any, ...], value: Any) -> Any:
    if value is None:
        if type(None) in options:
            return None
        raise SchemaError(f"null where one of {options} is required")
    errors = []
    for option in (o for o in options if o is not type(None)):
        try:
            return decode(option, value)
        except (SchemaError, TypeError, ValueError) as err:
            errors.append(str(err))
    raise SchemaError(f"{value!r} fits none of {options}: {'; '.join(errors)}")


def _decode_float(value: Any) -> float:
    """An int stays an int: ``float`` admits ints (the numeric tower), and a batch size among
    the bounds should read back as the 8 it was written as."""
    if isinstance(value, str) and value in NONFINITE:
        return NONFINITE[value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SchemaError(f"expected a number, got {value!r}")
    return value


def _decode_container(origin: type, args: tuple[Any, ...], value: Any) -> Any:
    if origin is dict:
        if not isinstance(value, dict):
            raise SchemaError(f"expected an object, got {value!r}")
        item = args[1] if args else Any
        return {k: decode(item, v) for k, v in value.items()}
    if not isinstance(value, list):
        raise SchemaError(f"expected an array, got {value!r}")
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v) for v in value)
        return tuple(decode(a, v) for a, v in zip(args or [Any] * len(value), value, strict=True))
    item = args[0] if args else Any
    return [decode(item, v) for v in value]


def _decode_dataclass(cls: type, value: Any) -> Any:
    if not isinstance(value, dict):
        raise SchemaError(f"expected an object for {cls.__name__}, got {value!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in getattr(cls, "flattened", ()):
            kwargs[f.name] = _decode_dataclass(hints[f.name], value)
        elif f.name in value:
            kwargs[f.name] = decode(hints[f.name], value[f.name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SchemaError(f"{cls.__name__}: the field {f.name!r} is missing")
    return cls(**kwargs)

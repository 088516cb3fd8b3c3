"""Typed dataclasses ⇄ plain data (YAML, JSON): the one serialiser of configs and stage artifacts.

A dataclass's type hints say what each field accepts; this module reads them once (`spec`) and walks a value
against them (`decode`), or a dataclass back into plain data (`encode`). Two users, two sets of rules:

- `config.py` (`ConfigRules` there): values typed by people in YAML or on the command line are *coerced* ("3" → 3,
  "a,b" → a list, "none" → None), checked against `Literal` choices, registry `Choices` and `Range`s, and every
  error names the file and the dotted field; unknown keys warn (files) or fail with a suggestion (command line).
- `artifacts.py` (`ArtifactRules` there): JSON a stage wrote is taken as it is (scalars unchanged); structure is
  checked (an object where an object belongs, a list where a list belongs), a missing required field is one line
  naming the file and the field, unknown keys are ignored (files of newer versions). A field with
  `metadata=FLATTEN` has no key of its own: its content sits in the enclosing object.

The walk, the type-hint reading and the encoding are here once; what differs between the two is a `Rules` object.
This is a lower layer: it imports nothing from the stage packages.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol, TypeVar, Union

from .registry import Registry
from .storage import to_jsonable

_C = TypeVar("_C", bound=type)
_R = TypeVar("_R")

FLATTEN = {"flatten": True}
"""Field metadata: the field's content is written into the enclosing object instead of under its own key."""


# ================================================================================================ what a hint allows


@dataclass(frozen=True)
class Range:
    """Allowed numeric interval of a field; `None` = unbounded, `*_open` = bound excluded."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False

    def contains(self, v: float) -> bool:
        if isinstance(v, float) and math.isnan(v):
            return False
        if self.min is not None and (v <= self.min if self.min_open else v < self.min):
            return False
        if self.max is not None and (v >= self.max if self.max_open else v > self.max):
            return False
        return True

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            lo, hi = "(" if self.min_open else "[", ")" if self.max_open else "]"
            return f"in {lo}{_num(self.min)}, {_num(self.max)}{hi}"
        if self.min is not None:
            return f"{'>' if self.min_open else '≥'} {_num(self.min)}"
        if self.max is not None:
            return f"{'<' if self.max_open else '≤'} {_num(self.max)}"
        return "any number"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Choices:
    """The allowed values of a string field are the names of a method registry (in its order)."""

    registry: Registry

    def names(self) -> tuple[str, ...]:
        return self.registry.names()


@dataclass(frozen=True)
class Spec:
    """What a field accepts, read off its type hint."""

    base: Any  # int | float | bool | str | a dataclass | list | dict | Any (a union of several types)
    item: Spec | None = None  # element type of a list, value type of a dict
    choices: tuple | None = None
    range: Range | None = None
    optional: bool = False

    @property
    def dataclass(self) -> type | None:
        """The dataclass this field holds, or None."""
        return self.base if isinstance(self.base, type) and dataclasses.is_dataclass(self.base) else None


def spec(hint: Any) -> Spec:
    """Read a type hint: `Annotated[T, Range | Choices]`, `T | None`, `Literal[...]`, `list[T]`, `dict[str, T]`."""
    optional, rng = False, None
    if typing.get_origin(hint) is Annotated:
        hint, *extras = typing.get_args(hint)
        rng = next((e for e in extras if isinstance(e, Range)), None)
        listed = next((e for e in extras if isinstance(e, Choices)), None)
        if listed is not None:
            return Spec(base=hint, choices=listed.names(), range=rng)
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            return Spec(base=Any, range=rng, optional=optional)
        inner = spec(args[0])
        return dataclasses.replace(inner, optional=optional or inner.optional, range=inner.range or rng)
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        return Spec(base=type(choices[0]), choices=choices, range=rng)
    if hint is list or typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (Any,)
        return Spec(base=list, item=spec(item), range=rng)
    if hint is dict or typing.get_origin(hint) is dict:
        _, value = typing.get_args(hint) or (str, Any)
        return Spec(base=dict, item=spec(value), range=rng)
    return Spec(base=hint, range=rng)


def _cache_per_class(fn: Callable[[_C], _R]) -> Callable[[_C], _R]:
    """`functools.cache` for a function of one class, keeping its signature.

    Classes are hashable, but mypy checks a dataclass class against `Hashable` through the unbound instance
    `__hash__` and rejects it at every call of a plain `functools.cache` wrapper."""
    return functools.cache(fn)


@_cache_per_class
def hints(cls: type) -> dict[str, Any]:
    """The type hints of a dataclass's fields, `Annotated` extras included."""
    return typing.get_type_hints(cls, include_extras=True)


def specs(cls: type) -> dict[str, Spec]:
    """What each field of `cls` accepts (read afresh: a registry's names can grow after import)."""
    return {name: spec(hint) for name, hint in hints(cls).items()}


def fields(cls: type) -> list[dataclasses.Field]:
    """The fields a dataclass's constructor takes, in order."""
    return [f for f in dataclasses.fields(cls) if f.init]


def required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def marked(cls: type, mark: object) -> tuple[str, ...]:
    """The fields of `cls` whose type is `Annotated[..., mark]`, in field order (a setting's role declared once,
    on the field, instead of a hand-kept list of names)."""
    return tuple(
        name for name, hint in hints(cls).items() if typing.get_origin(hint) is Annotated and mark in hint.__metadata__
    )


def join(where: str, key: Any) -> str:
    """The dotted place of `key` under `where`; a `where` ending in ": " is a prefix ("cfg.yaml: " → "cfg.yaml: k")."""
    if not where:
        return str(key)
    return f"{where}{key}" if where.endswith(": ") else f"{where}.{key}"


@_cache_per_class
def own_keys(cls: type) -> frozenset[str]:
    """The keys a dataclass reads itself, including those of flattened groups (not those of a flattened dict)."""
    keys: set[str] = set()
    for f in fields(cls):
        group = specs(cls)[f.name].dataclass
        if not f.metadata.get("flatten"):
            keys.add(f.name)
        elif group is not None:
            keys |= own_keys(group)
    return frozenset(keys)


def _free_form(cls: type) -> bool:
    """Whether `cls` keeps the keys no field reads (a flattened field that is not a dataclass)."""
    return any(f.metadata.get("flatten") and specs(cls)[f.name].dataclass is None for f in fields(cls))


# ================================================================================================ encode


def encode(value: Any) -> Any:
    """A dataclass as plain data: keys are the field names in field order, flattened fields merged in place;
    dicts, lists and tuples item by item; paths and numpy/torch scalars as plain JSON types."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in fields(type(value)):
            item = getattr(value, f.name)
            if f.metadata.get("flatten"):
                if item is not None:
                    out.update(encode(item))
            else:
                out[f.name] = encode(item)
        return out
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    return to_jsonable(value)


# ================================================================================================ decode


class Rules(Protocol):
    """What one user of `decode` does where configs and artifacts differ; each method raises its own error type."""

    def empty(self, where: str, spec: Spec) -> Any:
        """`value` is None (or the rules' spelling of it) for a field that is not optional."""

    def is_none(self, value: Any, spec: Spec) -> bool:
        """Whether `value` means "no value" for this field."""

    def not_a(self, want: str, where: str, spec: Spec, value: Any) -> Exception:
        """The error for a value of the wrong shape: `want` is "mapping" (a dataclass), "list" or "dict"."""

    def as_list(self, value: Any) -> Any:
        """The value a list field reads (the config rules split "a,b"); anything not a list is refused after."""

    def scalar(self, value: Any, spec: Spec, where: str) -> Any:
        """A leaf value: coerced and checked (configs), or taken as it is (artifacts)."""

    def unknown(self, cls: type, keys: list[str], where: str) -> None:
        """Keys `cls` does not read; called before any field is decoded."""

    def missing(self, cls: type, name: str, where: str) -> Exception:
        """The error for a required field that is absent."""

    def built(self, obj: Any, where: str) -> Any:
        """The object just built (the config rules run its `check()`)."""


def decode(s: Spec, value: Any, where: str, rules: Rules) -> Any:
    """`value` as the type `s` describes, checked and converted item by item under `rules`."""
    if rules.is_none(value, s):
        return None if s.optional else rules.empty(where, s)
    if (cls := s.dataclass) is not None:
        if not isinstance(value, dict):
            raise rules.not_a("mapping", where, s, value)
        return decode_fields(cls, value, where, rules)
    if s.base is list:
        value = rules.as_list(value)
        if not isinstance(value, (list, tuple)):
            raise rules.not_a("list", where, s, value)
        assert s.item is not None
        return [decode(s.item, v, f"{where}[{i}]", rules) for i, v in enumerate(value)]
    if s.base is dict and s.item is not None:
        if not isinstance(value, dict):
            raise rules.not_a("dict", where, s, value)
        return {k: decode(s.item, v, join(where, k), rules) for k, v in value.items()}
    return rules.scalar(value, s, where)


def decode_fields(cls: type, data: dict, where: str, rules: Rules) -> Any:
    """Build dataclass `cls` from mapping `data`: unknown keys go to the rules first, absent fields keep their
    defaults (a required one is the rules' error), flattened groups read their keys from `data` itself."""
    own = own_keys(cls)
    if not _free_form(cls):
        unknown = [str(k) for k in data if k not in own]
        if unknown:
            rules.unknown(cls, unknown, where)
    values: dict[str, Any] = {}
    for f in fields(cls):
        s = specs(cls)[f.name]
        if f.metadata.get("flatten"):
            group = s.dataclass
            if group is None:  # free-form extras: every key no other field reads
                values[f.name] = decode(s, {k: v for k, v in data.items() if k not in own}, where, rules)
            elif any(g.name in data for g in fields(group) if required(g)):
                keys = own_keys(group)
                values[f.name] = decode_fields(group, {k: v for k, v in data.items() if k in keys}, where, rules)
            else:
                values[f.name] = None  # a group only some files have (e.g. SAE curation metrics)
        elif f.name in data:
            values[f.name] = decode(s, data[f.name], join(where, f.name), rules)
        elif required(f):
            raise rules.missing(cls, f.name, where)
    return rules.built(cls(**values), where)

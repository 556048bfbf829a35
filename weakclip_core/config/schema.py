"""Generic, explicit validation of plain YAML data into typed dataclasses.

Every section of ``params.yaml`` is a frozen dataclass. ``build_dataclass``
walks the dataclass fields, checks each value's type against the annotation
and each declared range, and raises ``ConfigError`` naming the full key path
(``weakclip.prompt_len: expected int, got 'eight'``). There is no registry
and no string-to-class lookup: the annotation of each field says what it
holds, and nested sections are nested dataclasses.
"""

from __future__ import annotations

from weakclip_core.errors import InputError
import dataclasses
import math
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints


class ConfigError(InputError):
    """A params value is missing, unknown, of the wrong type or out of range."""


T = TypeVar("T")

NONE_PATH = "imports/none"
"""The placeholder a path param holds when it names nothing: a committed folder (``imports/none/NONE.md``),
so a ``dvc.yaml`` dep interpolated from the param always exists (DVC refuses a missing dep) and pointing the
param at a real file or folder changes the dep. ``""`` means the same where a param is not a dep."""


def given_path(value: str) -> str | None:
    """``value`` unless it is empty or the placeholder ``NONE_PATH`` (then ``None``)."""
    return None if value in ("", NONE_PATH) or value.rstrip("/") == NONE_PATH else value


def bounded(default: Any, *, low: float | None = None, high: float | None = None) -> Any:
    """A dataclass field whose numeric value (or every item of a list) lies in [low, high]."""
    if isinstance(default, (list, tuple, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata={"low": low, "high": high})
    return dataclasses.field(default=default, metadata={"low": low, "high": high})


def listed(default: list[Any], *, low: float | None = None, high: float | None = None) -> Any:
    """A list-valued field with a copied default, optionally with bounds on every item."""
    return dataclasses.field(default_factory=lambda: list(default), metadata={"low": low, "high": high})


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else f"{value!r} ({type(value).__name__})"


def _check_value(value: Any, annotation: Any, path: str) -> Any:
    """Return ``value`` converted to ``annotation`` or raise ``ConfigError`` naming ``path``."""
    origin = get_origin(annotation)
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping (section), got {_describe(value)}")
        return build_dataclass(annotation, value, path)
    if origin is Literal:
        choices = get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{path}: expected one of {list(choices)}, got {_describe(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in get_args(annotation):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_value(value, option, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {_describe(value)} matches none of "
                          f"{[getattr(a, '__name__', str(a)) for a in get_args(annotation)]}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {_describe(value)}")
        item_types = get_args(annotation)
        if origin is tuple and item_types and item_types[-1] is not Ellipsis:
            if len(value) != len(item_types):
                raise ConfigError(f"{path}: expected {len(item_types)} items, got {len(value)}")
            return tuple(_check_value(v, t, f"{path}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
        item_type = item_types[0] if item_types else Any
        items = [_check_value(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_describe(value)}")
        key_type, value_type = get_args(annotation) or (Any, Any)
        return {_check_value(k, key_type, f"{path}.<key>"): _check_value(v, value_type, f"{path}.{k}")
                for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected bool (true/false), got {_describe(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {_describe(value)}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected float, got {_describe(value)}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected str, got {_describe(value)}")
        return value
    raise TypeError(f"{path}: unsupported annotation {annotation!r} in the params schema")


def _bounds_text(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f">= {low} and <= {high}"
    return f">= {low}" if low is not None else f"<= {high}" if high is not None else "a number"


def check_range(value: Any, path: str, low: float | None = None, high: float | None = None) -> None:
    """The one range check: ``ConfigError`` naming ``path`` unless ``low <= value <= high`` (either bound may
    be ``None``). NaN fails it whatever the bounds (every comparison with NaN is false, so a plain
    ``value < low`` would let it through); ``None`` and strings are not numbers and are left to the type check."""
    if value is None or isinstance(value, (str, bool)):
        return
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{path}: nan is not a number, must be {_bounds_text(low, high)}")
    if low is not None and not value >= low:
        raise ConfigError(f"{path}: {value!r} is out of range, must be >= {low}")
    if high is not None and not value <= high:
        raise ConfigError(f"{path}: {value!r} is out of range, must be <= {high}")


def check_order(lower_key: str, lower: float, upper_key: str, upper: float, consequence: str = "") -> None:
    """A cross-field rule ``lower <= upper`` of one section (keys relative to it): ``ConfigError`` naming
    ``lower_key`` otherwise, NaN included (``build_dataclass`` prefixes the section's path); ``consequence``, when
    given, follows the message (what would go wrong, what to change)."""
    if not lower <= upper:
        raise ConfigError(f"{lower_key}: {lower!r} is above {upper_key} {upper!r}"
                          + (f": {consequence}" if consequence else ""))


def check_not_empty(key: str, items: Any) -> None:
    """A list that must hold at least one item (e.g. inference scales): ``ConfigError`` naming ``key``."""
    if len(items) == 0:
        raise ConfigError(f"{key}: expected at least one item, got an empty list")


def _check_bounds(value: Any, field: dataclasses.Field, path: str) -> None:
    """Every number of a field (or of its list) through ``check_range``, so NaN never passes, bounded or not."""
    low, high = field.metadata.get("low"), field.metadata.get("high")
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            check_range(item, f"{path}[{index}]", low, high)
        return
    check_range(value, path, low, high)


def build_dataclass(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Validate ``data`` into ``cls``; unknown keys, wrong types and bad ranges name their path."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown key (allowed here: {', '.join(sorted(fields))})")
    values = {}
    for name, field in fields.items():
        key_path = f"{path}.{name}" if path else name
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{key_path}: required key is missing")
            continue
        value = _check_value(data[name], hints[name], key_path)
        _check_bounds(value, field, key_path)
        values[name] = value
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as error:
            raise ConfigError(f"{path}.{error}" if path else str(error)) from None
    return instance


def to_plain(instance: Any) -> Any:
    """A dataclass tree as plain dicts/lists (for recording the params that made an artifact)."""
    if dataclasses.is_dataclass(instance):
        return {f.name: to_plain(getattr(instance, f.name)) for f in dataclasses.fields(instance)}
    if isinstance(instance, (list, tuple)):
        return [to_plain(v) for v in instance]
    if isinstance(instance, dict):
        return {k: to_plain(v) for k, v in instance.items()}
    return instance


def to_plain_without_defaults(instance: Any, keys_recorded_when_set: tuple[tuple[str, ...], ...]) -> dict[str, Any]:
    """``to_plain(instance)`` less each key (a path of field names) that holds its default.

    A model file records the params that made it. A key added after models were
    committed is left out while it holds its default, so a run with the defaults
    writes the same bytes as before the key existed (the file is a DVC output);
    loading fills the default back in.
    """
    recorded = to_plain(instance)
    default = type(instance)()
    for path in keys_recorded_when_set:
        *sections, key = path
        section, default_section = recorded, default
        for name in sections:
            section, default_section = section[name], getattr(default_section, name)
        if section[key] == getattr(default_section, key):
            section.pop(key)
    return recorded

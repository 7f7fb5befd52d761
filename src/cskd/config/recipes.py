"""Recipes: YAML files with ``base:`` inheritance, ``key=value`` overrides, strict typed
building of a :class:`~cskd.config.schema.Config`, and the ``--help`` listing and dump."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .rules import resolve, validate
from .schema import Config

SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
MAX_RECIPE_BYTES = 1_000_000  # a recipe is a few kB; anything near this is not one


class StrictLoader(yaml.SafeLoader):
    """YAML as a careful reader takes it: a key given twice in one mapping, and anchors and
    aliases (``&a`` / ``*a``: a few hundred bytes of them expand to gigabytes), are refused
    instead of silently keeping the last value or building the expansion."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent) or getattr(self.peek_event(), "anchor", None):
            mark = self.peek_event().start_mark
            raise ConfigError(
                f"YAML anchors and aliases (&name, *name) are not read in recipes (line "
                f"{mark.line + 1}): write the values out"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"duplicate key {key} (line {key_node.start_mark.line + 1}): YAML keeps only "
                    "the last one; write each key once"
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, *, where: str) -> Any:
    """``text`` parsed by :class:`StrictLoader`; :class:`ConfigError` naming ``where`` for text
    that is not valid YAML, or holds what the loader refuses."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    except (yaml.YAMLError, ValueError) as error:  # ValueError: an int of over 4,300 digits
        raise ConfigError(f"{where} is not valid YAML: {_short(str(error), 300)}") from None


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text):,} characters)"


def _convert(value: Any, kind: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``kind``; ints widen to floats, lists to tuples."""
    origin = typing.get_origin(kind)
    if kind is float and isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()):
        return float(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (str, int, float, bool):
        if type(value) is not kind:
            raise ConfigError(
                f"{key}: expected {kind.__name__}, got {type(value).__name__} {value!r}"
            )
        return value
    if kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = typing.get_args(kind)[0]
        fixed = typing.get_args(kind)[-1] is not Ellipsis
        if fixed and len(value) != len(typing.get_args(kind)):
            raise ConfigError(f"{key}: expected {len(typing.get_args(kind))} values, got {value!r}")
        return tuple(_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    raise TypeError(f"unsupported annotation {kind!r} for {key}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}: valid keys in "
            f"{prefix.rstrip('.') or 'the config'} are {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in values.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            kwargs[name] = _build(kind, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _convert(value, kind, f"{prefix}{name}")
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    """``update`` over ``base``, mappings merged key by key at every depth (a one-key override
    such as ``student.kwargs.img_size=48`` keeps the other kwargs). One named exception: when
    the same update also names another model (``name``), its ``kwargs`` replace the old ones,
    since keyword arguments belong to the model they were written for (``cskd.yaml`` turns the
    teacher recipe's CNN student into a ViT)."""
    merged = dict(base)
    for key, value in update.items():
        new_model = key == "kwargs" and update.get("name", base.get("name")) != base.get("name")
        if value is _CLEAR:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict) and not new_model:
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_recipe(path: str | Path, *, chain: tuple[Path, ...] = ()) -> dict:
    """The raw mapping of a recipe, with ``base:`` files merged underneath it. Refused with
    :class:`ConfigError`: a missing, oversized or non-UTF-8 file, YAML :class:`StrictLoader`
    rejects, a ``base:`` that is not one file name, and a ``base:`` chain that comes back to a
    file already in it (``chain``: the files that led here)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in chain:
        names = " -> ".join(str(p.name) for p in (*chain, path.resolve()))
        raise ConfigError(f"config file {path}: its base: chain is a cycle ({names})")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise ConfigError(
            f"config file {path} is larger than {MAX_RECIPE_BYTES:,} bytes: not a recipe"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {error.start}): save it as UTF-8"
        ) from None
    values = load_yaml(text, where=f"config file {path}") or {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    base = values.pop("base", None)
    if base is not None and (not isinstance(base, str) or not base.strip()):
        raise ConfigError(
            f"config file {path}: base: must be one file name (a recipe to build on), got "
            f"{_short(repr(base))}"
        )
    if base:
        return _merge(read_recipe(path.parent / base, chain=(*chain, path.resolve())), values)
    return values


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    if len(raw) > MAX_RECIPE_BYTES:
        raise ConfigError(f"override {key.strip()}: a value of {len(raw):,} characters")
    try:
        value = yaml.load(raw, Loader=StrictLoader) if raw else ""  # noqa: S506
    except ConfigError as error:
        raise ConfigError(f"override {key.strip()}: {error}") from None
    except ValueError as error:  # an int of over 4,300 digits
        raise ConfigError(f"override {key.strip()}: {_short(str(error))}") from None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` overrides in order. ``student.kwargs.depth=3`` sets one keyword
    argument and keeps the others; ``student.kwargs={...}`` (a whole mapping for a ``kwargs``
    key) replaces them all, as written."""
    for text in overrides:
        keys, value = parse_override(text)
        update: dict = {keys[-1]: value}
        for key in reversed(keys[:-1]):
            update = {key: update}
        if keys[-1] == "kwargs" and isinstance(value, dict):
            values = _merge(values, _without(update, keys))  # drop the old mapping first
        values = _merge(values, update)
    return values


def _without(update: dict, keys: list[str]) -> dict:
    """``update`` with the mapping at ``keys`` emptied (so that merging it clears that key)."""
    cleared: dict = {keys[-1]: _CLEAR}
    for key in reversed(keys[:-1]):
        cleared = {key: cleared}
    return cleared


_CLEAR = object()  # merged in place of a mapping, removes it


def from_dict(values: dict) -> Config:
    """A validated, resolved Config from a plain mapping of sections."""
    return resolve(validate(_build(Config, values, "")))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Resolve a recipe (or the defaults) plus ``key.path=value`` overrides into a Config."""
    values = read_recipe(path) if path else {}
    return from_dict(apply_overrides(values, overrides or []))


def to_dict(config: Config) -> dict:
    """Plain YAML-safe mapping (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def describe() -> str:
    """Every section and key with its default and its help text (the fields' metadata), for
    ``cskd train --help``."""
    lines = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        defaults = cls()
        lines.append(f"{section.name}:")
        for item in dataclasses.fields(cls):
            default = getattr(defaults, item.name)
            shown = json.dumps(list(default) if isinstance(default, tuple) else default)
            lines.append(f"  {section.name}.{item.name} = {shown}  # {item.metadata['help']}")
    return "\n".join(lines)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)

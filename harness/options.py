"""Settings written once: a dataclass per command, env or method, one documented field per setting.

A field's docstring (the string literal right under it, as in CleanRL) is its help text, read
from the source by ``field_docs``; ``option(...)`` adds what a command line needs beyond a type
and a default (extra flag spellings, a minimum, a variable of the environment, whether resuming
may change it). ``harness.cli.options`` turns such a dataclass into typer options, and
``parse_value`` / ``from_pairs`` read ``key=value`` strings (``--env-arg``, ``--method-arg``)
into a typed instance, so every setting is declared in exactly one place.

    @dataclass
    class ToyOptions:
        max_steps: int = option(6, flags=("--max-steps",))
        \"\"\"Agent turns before an episode is cut.\"\"\"
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
import types
import typing
from typing import Any

from harness.errors import ConfigError

__all__ = ["option", "field_docs", "field_meta", "field_type", "parse_value", "from_pairs", "describe_fields",
           "is_volatile", "check_ranges"]


def option(default: Any = dataclasses.MISSING, *, flags: tuple[str, ...] = (), volatile: bool = False,
           minimum: float | None = None, maximum: float | None = None, above: float | None = None,
           envvar: str | None = None, hidden: bool = False,
           cli: bool = True, default_factory: Any = dataclasses.MISSING, before: Any = dataclasses.MISSING,
           train: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with command-line metadata.

    ``flags``: the spellings of its option (default ``--<name with dashes>``; the first is the
    main one, the others aliases); ``volatile``: a transport setting (where things run, not what
    an episode is) that a resumed run may change; ``minimum`` / ``maximum``: the accepted range,
    ``above``: a strict lower bound (``check_ranges``; every number must also be finite);
    ``envvar``: read from this environment variable when not given; ``hidden``: accepted but not
    listed in ``--help`` (old spellings); ``cli``: False keeps it off the command line; ``before``:
    what a run stored before this setting existed did, when that is not the default (so resuming
    such a run keeps its behaviour: ``harness.cli.eval``); ``train``: the value ``harness train``
    uses when the user gives none, where training needs another default than evaluation
    (``envs.registry.training_settings``)."""
    meta = {"flags": tuple(flags), "volatile": volatile, "minimum": minimum, "maximum": maximum, "above": above,
            "envvar": envvar, "hidden": hidden, "cli": cli}
    if before is not dataclasses.MISSING:
        meta["before"] = before
    if train is not dataclasses.MISSING:
        meta["train"] = train
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_meta(f: dataclasses.Field) -> dict[str, Any]:
    return {"flags": (), "volatile": False, "minimum": None, "maximum": None, "above": None, "envvar": None,
            "hidden": False, "cli": True, **dict(f.metadata)}


def check_ranges(obj: Any, what: str, *, as_flags: bool = True) -> None:
    """Every number of dataclass instance ``obj`` is finite and inside its field's declared range;
    otherwise a one-line ``ConfigError`` naming the setting (as its flag, or as ``key`` for
    ``key=value`` settings when not ``as_flags``) and ``what`` it belongs to."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        meta = field_meta(f)
        name = (meta["flags"][0] if meta["flags"] else "--" + f.name.replace("_", "-")) if as_flags else f.name
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{what}: {name} must be a finite number, got {value}")
        lo, hi, above = meta["minimum"], meta["maximum"], meta["above"]
        if lo is not None and value < lo:
            raise ConfigError(f"{what}: {name} must be at least {lo:g}, got {value:g}")
        if hi is not None and value > hi:
            raise ConfigError(f"{what}: {name} must be at most {hi:g}, got {value:g}")
        if above is not None and value <= above:
            raise ConfigError(f"{what}: {name} must be greater than {above:g}, got {value:g}")


def is_volatile(cls: type, name: str) -> bool:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return name in fields and field_meta(fields[name])["volatile"]


@functools.lru_cache(maxsize=None)
def _class_docs(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    tree = ast.parse(source)
    body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef)), [])
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:] + [None]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """{field name: its docstring, whitespace folded} over ``cls`` and its dataclass bases."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            out.update(_class_docs(klass))
    return out


def field_type(cls: type, name: str) -> Any:
    """The field's annotation resolved to a type (``Optional[X]`` and ``X | None`` stay as given)."""
    hints = typing.get_type_hints(cls)
    return hints[name]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def parse_value(tp: Any, raw: str, what: str) -> Any:
    """``raw`` (from ``key=value``) as a value of type ``tp``; a clear error names ``what``."""
    inner, optional = _unwrap_optional(tp)
    if optional and raw.strip().lower() in ("none", "null"):
        return None
    if typing.get_origin(inner) is list:
        (item,) = typing.get_args(inner) or (str,)
        return [parse_value(item, part.strip(), what) for part in raw.split(",") if part.strip()]
    if inner is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{what} takes true or false, got '{raw}'")
    try:
        if inner is int:
            return int(raw)
        if inner is float:
            number = float(raw)
            if not math.isfinite(number):
                raise ConfigError(f"{what} takes a finite number, got '{raw}'")
            return number
    except ValueError:
        raise ConfigError(f"{what} takes a{'n' if inner is int else ''} {inner.__name__}, got '{raw}'") from None
    return raw


def from_pairs(cls: type, pairs: list[str], *, what: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``key=value`` strings -> {field: typed value} for dataclass ``cls`` (dashes in keys are
    underscores). An unknown key or a bad value is a ``ConfigError`` naming ``what``."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = dict(base or {})
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"{what} '{pair}' must look like key=value")
        key, raw = (x.strip() for x in pair.split("=", 1))
        key = key.replace("-", "_")
        if key not in names:
            raise ConfigError(f"{what}: no setting '{key}'. Settings: {', '.join(sorted(names)) or 'none'}")
        out[key] = parse_value(field_type(cls, key), raw, f"{what} {key}")
    return out


def describe_fields(cls: type) -> list[dict[str, Any]]:
    """One row per field: name, type, default, help (for ``--help`` listings and docs)."""
    docs = field_docs(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        tp, _ = _unwrap_optional(field_type(cls, f.name))
        rows.append({"name": f.name, "type": getattr(tp, "__name__", str(tp)), "default": default,
                     "help": docs.get(f.name, ""), "volatile": field_meta(f)["volatile"]})
    return rows

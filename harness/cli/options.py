"""Typer commands generated from settings dataclasses, so every option is written exactly once.

A command's settings are one dataclass (``EvalOptions``, ``TrainConfig`` ...) with a docstring
under every field (``harness.options``). ``command(...)`` builds the typer function from it:

- one option per field: ``--field-name`` (or the field's declared ``flags``), its default, its
  docstring as help, ``minimum`` / ``envvar`` / ``hidden`` from the field's metadata;
- the named flags that envs declare on their ``Options`` fields (``--user-model``,
  ``--appworld-url`` ...), default None ("the env's default"), collected from every registered
  env, plus ``--env-arg key=value`` for any env setting. The values go to the selected env:
  a value given for a setting the env does not have is an error, not silently dropped;
- for training, the named flags the method settings blocks declare (``--clip-high`` ...), plus
  old spellings kept as hidden aliases.

The command body gets the settings as keyword arguments, already split: the dataclass fields,
``env_settings`` and ``method_settings`` (plain dicts of what was given).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, Callable, Optional

import typer

from harness.errors import ConfigError
from harness.options import field_docs, field_meta, field_type, from_pairs, parse_value

__all__ = ["FlagGroup", "command", "dataclass_params", "flag_group"]

_ENV_PREFIX, _METHOD_PREFIX = "env__", "method__"


def _plain(text: str | None) -> str | None:
    """A docstring as help text: RST double backticks become single ones."""
    return text.replace("``", "`") if text else None


def _cli_type(tp: Any) -> tuple[Any, bool]:
    """(typer-compatible annotation, is optional). ``X | None`` becomes ``Optional[X]``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return Optional[_cli_type(inner)[0]], True
    if origin is list:
        return list[args[0] if args else str], False
    return tp, False


def dataclass_params(cls: type, *, skip: tuple[str, ...] = (), defaults: dict[str, Any] | None = None,
                     panel: str | None = None) -> list[inspect.Parameter]:
    """One typer option per field of ``cls`` (see the module docstring); ``defaults`` replaces a
    field's default (a command that shares a dataclass with other defaults, e.g. the suite)."""
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = field_meta(f)
        if not meta["cli"] or f.name in skip:
            continue
        if defaults and f.name in defaults:
            default = defaults[f.name]
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = None  # a list/dict default: "none given"
        else:
            default = ...  # required
        annotation, _ = _cli_type(field_type(cls, f.name))
        if default is None and not _cli_type(field_type(cls, f.name))[1]:
            annotation = Optional[annotation]
        kwargs: dict[str, Any] = {"help": _plain(docs.get(f.name)), "hidden": meta["hidden"],
                                  "rich_help_panel": panel}
        if meta["minimum"] is not None:
            kwargs["min"] = meta["minimum"]
        if meta["envvar"]:
            kwargs["envvar"] = meta["envvar"]
        flags = meta["flags"] or ("--" + f.name.replace("_", "-"),)
        out.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                     default=typer.Option(default, *flags, **kwargs)))
    return out


@dataclasses.dataclass
class FlagGroup:
    """Named flags declared by several settings classes (the envs' options, or the method blocks),
    collected into one set of optional options whose values are routed by field name."""

    params: list[inspect.Parameter]
    fields: dict[str, str]
    """Parameter name -> the settings field it sets."""
    prefix: str


def flag_group(owners: dict[str, type], prefix: str, panel: str,
               aliases: dict[str, tuple[str, Any, str]] | None = None) -> FlagGroup:
    """The flags that the dataclasses in ``owners`` ({owner name: class}) declare; ``aliases``
    adds hidden old spellings: {flag: (field, type, help)}. Two owners may share a flag only for
    the same field."""
    found: dict[str, dict[str, Any]] = {}
    for owner, cls in owners.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            meta = field_meta(f)
            if not meta["flags"]:
                continue
            key = meta["flags"][0]
            entry = found.setdefault(key, {"field": f.name, "flags": meta["flags"], "helps": [], "owners": [],
                                           "type": _cli_type(field_type(cls, f.name))[0], "minimum": meta["minimum"]})
            if entry["field"] != f.name:
                raise TypeError(f"flag {key} is {entry['field']} for {entry['owners']} but {f.name} for {owner}")
            entry["owners"].append(owner)
            doc = docs.get(f.name, "")
            if doc and doc not in [h for _, h in entry["helps"]]:
                entry["helps"].append((owner, doc))
    params, fields = [], {}
    for key, entry in found.items():
        helps = entry["helps"]
        # name the owners when the flag is not everyone's (an env's flag under several envs)
        text = " ".join(f"{o}: {h}" for o, h in helps) if len(owners) > 1 else helps[0][1] if helps else ""
        name = prefix + entry["field"]
        tp = entry["type"]
        kwargs: dict[str, Any] = {"help": _plain(text), "rich_help_panel": panel}
        if entry["minimum"] is not None:
            kwargs["min"] = entry["minimum"]
        annotation = tp if typing.get_origin(tp) is Optional or type(None) in typing.get_args(tp) else Optional[tp]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=typer.Option(None, *entry["flags"], **kwargs)))
        fields[name] = entry["field"]
    for flag, (field, tp, text) in (aliases or {}).items():
        name = prefix + "alias_" + flag.lstrip("-").replace("-", "_")
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[tp],
                                        default=typer.Option(None, flag, help=text, hidden=True)))
        fields[name] = field
    return FlagGroup(params, fields, prefix)


def split_values(kwargs: dict[str, Any], group: FlagGroup | None) -> dict[str, Any]:
    """Pop the group's values out of ``kwargs``: {field: value} of the flags given."""
    out: dict[str, Any] = {}
    if group is None:
        return out
    for name, field in group.fields.items():
        value = kwargs.pop(name, None)
        if value is not None and not (isinstance(value, (list, tuple)) and not value):
            out[field] = list(value) if isinstance(value, tuple) else value
    return out


def env_values(env_cls: type, flags: dict[str, Any], pairs: list[str]) -> dict[str, Any]:
    """The selected env's settings from its named flags and ``--env-arg`` pairs (typed by its
    ``Options``); a flag for a setting the env does not have is an error."""
    known = {f.name for f in dataclasses.fields(env_cls.Options)}
    foreign = sorted(k for k in flags if k not in known)
    if foreign:
        raise ConfigError(f"env {env_cls.name} takes no setting {', '.join(foreign)} (given as a flag); "
                          f"its settings: {', '.join(sorted(known)) or 'none'}")
    return from_pairs(env_cls.Options, pairs, what=f"--env-arg (env {env_cls.name})", base=flags)


def command(name: str, doc: str, params: list[inspect.Parameter], body: Callable[..., Any]) -> Callable[..., Any]:
    """A typer command function with signature ``params`` that calls ``body(**values)``."""

    def run(**kwargs: Any) -> Any:
        return body(**kwargs)

    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in params}
    run.__name__ = name.replace("-", "_")
    run.__doc__ = doc
    return run


def typed(cls: type, key: str, raw: str, what: str) -> Any:
    return parse_value(field_type(cls, key), raw, what)

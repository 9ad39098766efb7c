"""A driver's own flags defined once: a frozen dataclass whose fields carry their flag and help, from which both the
argparse group and the typed, frozen value are made (SFT, reward model, PPO). The shared flags stay in
config/args.py."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def option(default=dataclasses.MISSING, help: str | None = None, *, flag: str | None = None,
           aliases: tuple[str, ...] = (), choices=None, elsewhere: bool = False):
    """A field of an options dataclass. flag: default `--<field-name>`; no default: the flag is required;
    elsewhere: the flag is added by another group (e.g. add_generation_args) and only read here."""
    return dataclasses.field(default=default, metadata={
        "help": help, "flag": flag, "aliases": aliases, "choices": choices, "elsewhere": elsewhere})


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _dest(f: dataclasses.Field) -> str:
    return f.name if f.metadata.get("elsewhere") else _flag(f).lstrip("-").replace("-", "_")


def add_options(group: argparse._ArgumentGroup, cls) -> None:
    """One argparse argument per field of `cls`, typed from its annotation (X | None: optional X; bool: a
    store_true switch; tuple[int, ...]: a list of ints)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        md = f.metadata
        if md.get("elsewhere"):
            continue
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        kw: dict = {"help": md.get("help")}
        if f.default is dataclasses.MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
        if kind is bool:
            kw["action"] = "store_true"
        elif typing.get_origin(kind) is tuple:
            kw.update(type=typing.get_args(kind)[0], nargs="*")
        else:
            kw.update(type=kind, choices=md.get("choices"))
        group.add_argument(_flag(f), *md.get("aliases", ()), dest=_dest(f), **kw)


def options_from_args(ns: argparse.Namespace, cls):
    """The frozen options value of the parsed flags."""
    values = {f.name: getattr(ns, _dest(f)) for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


__all__ = ["option", "add_options", "options_from_args"]

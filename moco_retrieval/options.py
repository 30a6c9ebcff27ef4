"""Command-line options defined once: a dataclass field carries its default, flags and help, and the
argparse parser (and, for the server, RETRIEVAL_* environment variables) is derived from it.

    @dataclass
    class Config:
        port: int = option(50051, help="gRPC port")

A small helper of our own rather than a dependency: argparse is what the official MoCo scripts and
PyTorch's reference scripts use, so flags, help and errors look the same, and nothing else is needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import MISSING
from typing import Any, TypeVar

T = TypeVar("T")


def option(
    default: Any = MISSING,
    *flags: str,
    help: str,  # noqa: A002 - argparse's name for it
    positional: bool = False,
    metavar: str | None = None,
    choices: tuple | None = None,
    env: bool = True,
) -> Any:
    """A dataclass field that is also a command-line option.

    default: MISSING makes the option required (or positional with `positional`); flags: the
    option strings (default --field-name); env: whether RETRIEVAL_<NAME> may set it (see add_options).
    """
    meta = {"flags": flags, "help": help, "positional": positional, "metavar": metavar, "choices": choices, "env": env}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


LIST_DEFAULT = "__list_default"  # where a list option's default waits (argparse's extend would append to it)


def _base_type(hint: Any) -> tuple[type, bool]:
    """(the element type, whether it is a list) of `int`, `int | None`, `list[int]`, `Path | None`..."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True
    return hint, False


def _parse_bool(value: str) -> bool:
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {value!r}")


def env_name(prefix: str, field_name: str) -> str:
    return prefix + field_name.upper()


def add_options(parser: argparse.ArgumentParser, cls: type, env_prefix: str | None = None) -> None:
    """Add every option() field of dataclass `cls` to `parser`. With env_prefix, a set environment
    variable PREFIX<NAME> (e.g. RETRIEVAL_PORT) becomes that option's default (flags still win)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        kind, is_list = _base_type(hints[f.name])
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        env_var = env_name(env_prefix, f.name) if env_prefix and meta["env"] else None
        if env_var and env_var in os.environ:
            raw = os.environ[env_var]
            default = _parse_bool(raw) if kind is bool else [kind(v) for v in raw.split()] if is_list else kind(raw)
        help_text = meta["help"] + (f" (env {env_var})" if env_var else "")
        if meta["positional"]:
            parser.add_argument(f.name, type=kind, metavar=meta["metavar"], help=help_text)
            continue
        flags = meta["flags"] or ("--" + f.name.replace("_", "-"),)
        kwargs: dict[str, Any] = {"dest": f.name, "help": help_text}
        if kind is bool:  # --flag, or --flag/--no-flag when the default is on or unset (None)
            kwargs.update(action="store_true" if default is False else argparse.BooleanOptionalAction, default=default)
        else:
            kwargs.update(type=kind, metavar=meta["metavar"], choices=meta["choices"])
            if default is MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = default
                if default is not None and default != [] and "%(default)" not in help_text:
                    kwargs["help"] = f"{help_text} (default: %(default)s)"
            if is_list:  # --flag a b and --flag a --flag b; the list given replaces the default
                kwargs.update(nargs="+", action="extend", default=None)
                if default and default is not MISSING:
                    kwargs["help"] = f"{help_text} (default: {' '.join(map(str, default))})"
                parser.set_defaults(**{f"{f.name}{LIST_DEFAULT}": default})
        parser.add_argument(*flags, **kwargs)


def from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """The dataclass built from the parsed options (fields the parser did not add keep their default)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    for name, value in values.items():
        if value is None and hasattr(args, name + LIST_DEFAULT):  # a list option not given
            values[name] = getattr(args, name + LIST_DEFAULT)
    return cls(**{**values, **overrides})

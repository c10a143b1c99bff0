"""Build an argparse sub-command from a typed function: its docstring is the help.

A command is a plain function with keyword parameters. Each parameter becomes ``--name`` (with
``_`` -> ``-``); its type hint picks the parser (``bool`` -> a ``--flag/--no-flag`` pair,
``list[str]`` -> repeatable); the ``Args:`` section of the docstring gives each flag's help.
A parameter whose type is a dataclass contributes one flag per field (documented in the
dataclass's own ``Args:``), so option groups shared by several commands are written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Callable
from typing import Any


def add_command(subparsers: Any, func: Callable[..., Any], name: str | None = None) -> None:
    summary, arg_help = _parse_docstring(inspect.getdoc(func) or "")
    parser = subparsers.add_parser(
        name or func.__name__,
        help=summary.splitlines()[0] if summary else None,
        description=summary,
        formatter_class=_HelpFormatter,
    )
    groups: dict[str, type] = {}
    for pname, hint, default, help_text in _parameters(func, arg_help):
        if dataclasses.is_dataclass(hint):
            groups[pname] = hint  # type: ignore[assignment]
            group = parser.add_argument_group(pname)
            _, field_help = _parse_docstring(inspect.getdoc(hint) or "")
            for fname, fhint, fdefault, fhelp in _fields(hint, field_help):
                _add_flag(group, fname, fhint, fdefault, fhelp, required=False)
        else:
            _add_flag(parser, pname, hint, default, help_text, required=default is _REQUIRED)
    parser.set_defaults(_command=func, _groups=groups)


def call_command(args: argparse.Namespace) -> Any:
    """Call the function a parsed command line names, rebuilding dataclass option groups."""
    values = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    kwargs: dict[str, Any] = {}
    for pname, cls in args._groups.items():
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs[pname] = cls(**{k: values.pop(k) for k in list(values) if k in names})
    kwargs.update(values)
    return args._command(**kwargs)


_REQUIRED = object()


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only when it has one: an unset (None) flag's help says what
    happens instead, and "(default: None)" would contradict it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _parameters(func: Callable[..., Any], helps: dict[str, str]) -> list[tuple[str, Any, Any, str]]:
    hints = typing.get_type_hints(func)
    out = []
    for pname, param in inspect.signature(func).parameters.items():
        default = _REQUIRED if param.default is inspect.Parameter.empty else param.default
        out.append((pname, hints.get(pname, str), default, helps.get(pname, "")))
    return out


def _fields(cls: type, helps: dict[str, str]) -> list[tuple[str, Any, Any, str]]:
    hints = typing.get_type_hints(cls)
    return [
        (f.name, hints[f.name], f.default, helps.get(f.name, "")) for f in dataclasses.fields(cls)
    ]


def _add_flag(
    parser: Any, name: str, hint: Any, default: Any, help_text: str, required: bool
) -> None:
    flag = "--" + name.replace("_", "-")
    base, is_list = _unwrap(hint)
    # NOTE: argparse %-formats help (for %(default)s); a docstring's "90%" is plain text.
    help_text = help_text.replace("%", "%%")
    if base is bool:
        parser.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
        )
    elif is_list:
        parser.add_argument(
            flag, type=base, action="append", default=None, help=help_text + " (repeatable)"
        )
    else:
        parser.add_argument(
            flag,
            type=base,
            default=None if required else default,
            required=required,
            help=help_text,
        )


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """``int | None`` -> (int, False); ``list[str] | None`` -> (str, True)."""
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        return _unwrap(args[0])
    if origin is list:
        return args[0], True
    return hint, False


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    summary, _, args_block = doc.partition("\nArgs:\n")
    helps: dict[str, str] = {}
    current = None
    for line in args_block.splitlines():
        match = re.match(r"\s{4}(\w+):\s*(.*)", line)
        if match:
            current = match.group(1)
            helps[current] = match.group(2)
        elif current and line.strip():
            helps[current] += " " + line.strip()
    return summary.strip(), helps

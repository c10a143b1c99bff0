"""Build an argparse sub-command from a typed function: its docstring is the help.

A command is a plain function with keyword parameters. Each parameter becomes ``--name`` (with
``_`` -> ``-``); its type hint picks the parser (``bool`` -> a ``--flag/--no-flag`` pair,
``list[str]`` -> repeatable); the ``Args:`` section of the docstring gives each flag's help.
A parameter whose type is a dataclass contributes one flag per field (documented in the
dataclass's own ``Args:``), so option groups shared by several commands are written once.

Every command also takes ``--config FILE`` (``.yaml``, ``.yml`` or ``.json``): a mapping of its
flags (``max_new_tokens: 64`` or ``max-new-tokens: 64``) read as if each were typed on the
command line, where flags that are typed win over the file's, wherever they stand.

NOTE: not ``jsonargparse``, although it builds parsers from typed functions and docstrings and
has ``--config``: tried (4.53.0) on kiln's commands, it changes the flags people and tests use:
``--max_new_tokens`` for ``--max-new-tokens`` (the dashed form is rejected: "unrecognized
arguments"), ``--ignore_eos {true,false}`` for ``--ignore-eos/--no-ignore-eos``, a dataclass's
fields as ``--sampling.temperature`` for ``--temperature``, and a repeated ``--stop a --stop b``
fails ("Does not validate against any of the Union subtypes"; it wants ``--stop+ a``). The
issue's condition for switching, every command's flags as they are, does not hold.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
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
    flags: dict[str, argparse.Action] = {}
    for pname, hint, default, help_text in _parameters(func, arg_help):
        if dataclasses.is_dataclass(hint):
            groups[pname] = hint  # type: ignore[assignment]
            group = parser.add_argument_group(pname)
            _, field_help = _parse_docstring(inspect.getdoc(hint) or "")
            for fname, fhint, fdefault, fhelp in _fields(hint, field_help):
                flags[fname] = _add_flag(group, fname, fhint, fdefault, fhelp, required=False)
        else:
            required = default is _REQUIRED
            flags[pname] = _add_flag(parser, pname, hint, default, help_text, required)
    parser.add_argument(
        "--config",
        action=functools.partial(_ConfigAction, flags=flags),
        dest="_config",
        metavar="FILE",
        help="a YAML (.yaml, .yml) or JSON (.json) file of this command's flags, keyed by "
        "flag name (max_new_tokens or max-new-tokens); flags typed on the command line win.",
    )
    parser.set_defaults(_command=func, _groups=groups)


def call_command(args: argparse.Namespace) -> Any:
    """Call the function a parsed command line names, with the ``--config`` file's values for
    the flags not typed, rebuilding dataclass option groups."""
    values = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    given = getattr(args, "_given", set())
    for dest, value in getattr(args, "_config_values", {}).items():
        if dest not in given:
            values[dest] = value
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
) -> argparse.Action:
    flag = "--" + name.replace("_", "-")
    base, is_list = _unwrap(hint)
    # NOTE: argparse %-formats help (for %(default)s); a docstring's "90%" is plain text.
    help_text = help_text.replace("%", "%%")
    if base is bool:
        return parser.add_argument(flag, action=_Switch, default=default, help=help_text)
    if is_list:
        return parser.add_argument(
            flag, type=base, action=_Append, default=None, help=help_text + " (repeatable)"
        )
    return parser.add_argument(
        flag,
        type=base,
        action=_Store,
        default=None if required else default,
        required=required,
        help=help_text,
    )


# The flag actions note which flags were typed, so that a --config file fills in only the others
# (argparse itself does not tell a typed value from a default).


def _mark_given(namespace: argparse.Namespace, dest: str) -> None:
    namespace._given = {*getattr(namespace, "_given", ()), dest}


class _Store(argparse.Action):
    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        setattr(namespace, self.dest, values)
        _mark_given(namespace, self.dest)


class _Append(argparse.Action):
    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        # A new list each time: the default must never be appended to in place.
        setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), values])
        _mark_given(namespace, self.dest)


class _Switch(argparse.BooleanOptionalAction):
    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        super().__call__(parser, namespace, values, option)
        _mark_given(namespace, self.dest)


class _ConfigAction(argparse.Action):
    """``--config FILE``: reads and checks the file as it is parsed (so a bad file is a usage
    error, exit 2, before anything loads); :func:`call_command` applies it."""

    def __init__(self, *args: Any, flags: dict[str, argparse.Action], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flags = flags

    def __call__(
        self, parser: Any, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        path = str(values)
        loaded = _read_config(parser, path)
        config = dict(getattr(namespace, "_config_values", None) or {})
        for key, value in loaded.items():
            dest = str(key).replace("-", "_")
            action = self.flags.get(dest)
            if action is None:
                parser.error(f"{path}: {key!r} is not a flag of this command")
            config[dest] = _config_value(parser, path, key, action, value)
            # NOTE: argparse checks required flags after every argument is read; one the file
            # gives is required no more.
            action.required = False
        namespace._config_values = config
        namespace._config = path


def _read_config(parser: argparse.ArgumentParser, path: str) -> dict[Any, Any]:
    if not path.endswith((".json", ".yaml", ".yml")):
        parser.error(f"{path}: a config file is .yaml, .yml or .json")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"{path}: {e}")
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except ValueError as e:
            parser.error(f"{path}: not valid JSON: {e}")
    else:
        import yaml  # only YAML configs need it

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            parser.error(f"{path}: not valid YAML: {e}")
    if data is None:  # an empty YAML file
        return {}
    if not isinstance(data, dict):
        parser.error(f"{path}: expected a mapping of flag names to values")
    return data


def _config_value(
    parser: argparse.ArgumentParser, path: str, key: Any, action: argparse.Action, value: Any
) -> Any:
    """A file's value, converted as the same value typed after the flag would be."""
    if value is None:
        return None
    if isinstance(action, _Switch):
        if not isinstance(value, bool):
            parser.error(f"{path}: {key!r} must be true or false, got {value!r}")
        return value
    if isinstance(action, _Append):
        items = value if isinstance(value, list) else [value]
        return [_typed(parser, path, key, action, item) for item in items]
    return _typed(parser, path, key, action, value)


def _typed(
    parser: argparse.ArgumentParser, path: str, key: Any, action: argparse.Action, value: Any
) -> Any:
    # NOTE: YAML reads `yes`/`no` as booleans; taken as text, "True" would pass as a string.
    if isinstance(value, (bool, dict, list)):
        parser.error(f"{path}: {key!r} got {value!r}")
    convert = action.type or str
    try:
        return convert(str(value))
    except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
        parser.error(f"{path}: {key!r}: invalid value {value!r} ({e})")


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

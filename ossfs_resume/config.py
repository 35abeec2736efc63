"""``--config FILE``: option values from a TOML file, under those on the command line.

Keys are option names, with ``-`` or ``_`` (``cache-size = "20G"``). Top-level
keys apply to every command having that option; a ``[mount]``, ``[download]``,
``[prefetch]`` (...) table holds one command's values and wins over top-level
keys. The file's values become the parser's defaults before the one real parse,
so a flag given on the command line always wins, and an option the file sets is
no longer required on the command line.

No credentials: keys named like an access key, secret, token or password are
refused; keys come from the environment (or the credentials file).

The parser is used through argparse's documented attributes of actions
(``option_strings``, ``dest``, ``default``, ``required``, ``nargs``, ``choices``,
``type``, ``const``) and the subparsers' ``choices``; this module does not import
argparse itself (commands live in cli.py).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from .errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SECRET_KEY = re.compile(r"access[-_]?key|secret|token|password|credential", re.IGNORECASE)
MASK = "********"
_NOT_OPTIONS = {"help", "version", "config"}


def load_config(path: str | Path) -> dict[str, Any]:
    """The TOML file at `path`, or one UsageError naming the file and the problem."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from None
    return data


def _subparsers(parser: Any) -> dict[str, Any]:
    for action in parser._actions:
        if isinstance(getattr(action, "choices", None), dict) and action.nargs == "A...":
            return dict(action.choices)
    return {}


def _options(parser: Any) -> dict[str, Any]:
    """Key (dest, with '_') -> action, for the options (not positionals) of `parser`."""
    found = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in _NOT_OPTIONS:
            continue
        if action.nargs == 0 and action.const is None and action.default is None:
            continue  # help-like
        found[action.dest] = action
        for opt in action.option_strings:
            if opt.startswith("--"):
                found[opt[2:].replace("-", "_")] = action
    return found


def _command_path(parser: Any, argv: list[str]) -> list[tuple[str, Any]]:
    """The (name, subparser) chain `argv` selects: [("cache", p), ("stats", p2)]."""
    chain = []
    current = parser
    for token in argv:
        subs = _subparsers(current)
        if not subs:
            break
        if token in subs:
            current = subs[token]
            chain.append((token, current))
    return chain


def _config_arg(argv: list[str]) -> str | None:
    found = None
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config" and i + 1 < len(argv):
            found = argv[i + 1]
        elif token.startswith("--config="):
            found = token.split("=", 1)[1]
    return found


def _check_keys(data: dict[str, Any], parser: Any, path: str | Path) -> None:
    commands = _subparsers(parser)
    every: set[str] = set()
    for sub in commands.values():
        every.update(_options(sub))
        for inner in _subparsers(sub).values():
            every.update(_options(inner))

    def check(key: str, known: set[str], where: str) -> None:
        norm = key.replace("-", "_")
        if SECRET_KEY.search(norm):
            raise UsageError(
                f"config file {path}: {where}{key} looks like a credential: keys do not belong "
                "in the config file; set them in the environment (OSS_ACCESS_KEY_ID/"
                "OSS_ACCESS_KEY_SECRET or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) or the "
                "credentials file"
            )
        if norm not in known:
            raise UsageError(f"config file {path}: unknown key {where}{key}")

    for key, value in data.items():
        if isinstance(value, dict):
            if key not in commands:
                raise UsageError(f"config file {path}: unknown table [{key}]")
            known = set(_options(commands[key]))
            for inner in _subparsers(commands[key]).values():
                known.update(_options(inner))
            for inner_key in value:
                check(inner_key, known, f"[{key}] ")
        else:
            check(key, every, "")


def _values_for(data: dict[str, Any], chain: list[tuple[str, Any]]) -> dict[str, Any]:
    """The file's values for the command `chain` names: top level, then its table."""
    values = {k.replace("-", "_"): v for k, v in data.items() if not isinstance(v, dict)}
    if chain:
        table = data.get(chain[0][0], {})
        values.update({k.replace("-", "_"): v for k, v in table.items()})
    return values


def _convert(action: Any, key: str, value: Any, path: str | Path) -> Any:
    name = action.option_strings[-1]
    if action.nargs == 0:
        if action.const is None:  # a count (-v): a number
            if isinstance(value, bool) or not isinstance(value, int):
                raise UsageError(f"config file {path}: {key} must be a number")
            return value
        if not isinstance(value, bool):
            raise UsageError(f"config file {path}: {key} must be true or false")
        return action.const if value else action.default
    if isinstance(value, (dict, list)):
        raise UsageError(f"config file {path}: {key} must be a single value")
    if isinstance(value, bool):
        raise UsageError(f"config file {path}: {key} must not be true/false ({name} VALUE)")
    if action.type is int:
        if not isinstance(value, int):
            try:
                value = int(str(value))
            except ValueError:
                raise UsageError(f"config file {path}: {key} must be a whole number") from None
    else:
        value = str(value)
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise UsageError(f"config file {path}: {key} = {value!r}: expected one of {choices}")
    return value


def apply_config(parser: Any, argv: list[str], path: str | Path) -> dict[str, Any]:
    """Make the file's values the defaults of the command `argv` selects; returns them
    (key -> value) for the options that command has."""
    data = load_config(path)
    _check_keys(data, parser, path)
    chain = _command_path(parser, argv)
    if not chain:
        return {}
    target = chain[-1][1]
    options = _options(target)
    applied = {}
    for key, value in _values_for(data, chain).items():
        action = options.get(key)
        if action is None:
            continue  # a shared key for other commands
        action.default = _convert(action, key, value, path)
        action.required = False
        applied[action.dest] = action.default
    return applied


def parse_with_config(parser: Any, argv: list[str]) -> Any:
    """``parser.parse_args(argv)``, under the values of ``--config FILE`` if given."""
    path = _config_arg(argv)
    if path is not None:
        apply_config(parser, argv, path)
    return parser.parse_args(argv)


def _given(action: Any, argv: list[str]) -> bool:
    for token in argv:
        if token == "--":
            return False
        for opt in action.option_strings:
            if token == opt or (opt.startswith("--") and token.startswith(opt + "=")):
                return True
            if not opt.startswith("--") and token.startswith(opt) and not token.startswith("--"):
                return True
    return False


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def show_config(parser: Any, command: str, argv: list[str], path: str | None) -> str:
    """The effective option values of `command` given `argv` and the config file at `path`,
    TOML-like, each with its source; credential-like values masked."""
    words = command.split()
    chain = _command_path(parser, words)
    if [name for name, _ in chain] != words:
        raise UsageError(f"config show: unknown command {command!r}")
    target = chain[-1][1]
    from_file = apply_config(parser, words, path) if path else {}
    # Positionals made optional: show needs only the options.
    for action in target._actions:
        if not action.option_strings and action.nargs in (None, "+"):
            action.nargs = "?" if action.nargs is None else "*"
        action.required = False
    parsed, _unknown = target.parse_known_args(argv)
    shown: set[str] = set()
    lines = [f"# ossfs-resume {command}" + (f" (config file {path})" if path else "")]
    for action in target._actions:
        if not action.option_strings or action.dest in _NOT_OPTIONS or action.dest in shown:
            continue
        if action.nargs == 0 and action.const is None and action.default is None:
            continue
        shown.add(action.dest)
        value = getattr(parsed, action.dest, None)
        if _given(action, argv):
            source = "flag"
        elif action.dest in from_file:
            source = "config file"
        else:
            source = "default"
        if value is not None and SECRET_KEY.search(action.dest):
            value = MASK
        name = action.dest.replace("_", "-")
        if value is None:
            lines.append(f"# {name} = (not set)  # {source}")
        else:
            lines.append(f"{name} = {_toml_value(value)}  # {source}")
    return "\n".join(lines) + "\n"

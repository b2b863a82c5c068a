"""Flags and YAML files from typed dataclasses: the parsing every ``deltatune`` command shares.

One flag per dataclass field (``--max-steps`` and ``--max_steps``), its help from the field's docstring,
``--config FILE.yaml`` for any subset, booleans as ``--flag`` / ``--no-flag``; short errors with a
"did you mean" for a mistyped flag, YAML keys checked against the settings and named with their file.
Imports nothing of deltatune (jsonargparse and yaml when a parser is built).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import re
import sys
import textwrap
from pathlib import Path
from typing import Optional, get_type_hints

__all__ = ["dataclass_parser", "parse_dataclass", "fail"]


def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal under each field) of a dataclass, by field name."""
    docs = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                    and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _add_fields(parser, cls, exclude=(), defaults: Optional[dict] = None, aliases: Optional[dict] = None) -> None:
    """One flag per field of dataclass ``cls`` (both ``--max-steps`` and ``--max_steps``) on ``parser``
    (a parser or an argument group); help from the field's docstring. ``aliases`` maps a field to
    other names it also answers to, as flags and as YAML keys (``{"dropout": ["lora_dropout"]}``)."""
    from jsonargparse import ActionYesNo

    hints = get_type_hints(cls)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = (defaults or {}).get(f.name, default)
        flags = []
        for name in [f.name] + list((aliases or {}).get(f.name, ())):
            flags += [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        kind = hints[f.name]
        if default is None:
            kind = Optional[kind]
        if kind is bool or kind == Optional[bool]:
            parser.add_argument(flags[0], dest=f.name, action=ActionYesNo(no_prefix="no-"), default=default,
                                help=docs.get(f.name, ""))  # --flag / --no-flag: no aliases
        else:
            parser.add_argument(*flags, dest=f.name, type=kind, default=default, help=docs.get(f.name, ""))


@functools.lru_cache(maxsize=None)
def _parser_class():
    """jsonargparse's ArgumentParser with short errors: the error first, a "did you mean" for a
    mistyped flag, and a pointer to --help instead of a 35-line usage dump."""
    from jsonargparse import ArgumentParser

    class Parser(ArgumentParser):
        def error(self, message: str, ex: Optional[Exception] = None):
            if not self.exit_on_error:
                return super().error(message, ex)
            words = [w.split("=", 1)[0] for w in message.replace("'", " ").split() if w.startswith("--")]
            hints = [hint for word in words if (hint := _did_you_mean(word, _option_names(self)))]
            message = re.sub(r'Parser key "(\w+)":\s*', lambda m: f"--{m.group(1).replace('_', '-')}: ", message)
            fail(self.prog, " ".join(message.split()) + "".join(f"; {h}" for h in hints), help_hint=True)

    return Parser


def _option_names(parser) -> list[str]:
    """Every long flag of ``parser`` (``--max-steps``, ``--max_steps``, ``--no-fast``, ...)."""
    return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]


def _did_you_mean(word: str, names: list[str]) -> str:
    """'did you mean `--lr`?' for a mistyped ``word`` among ``names`` ('' if nothing is close). A flag
    cut short (``--max-step``) is named as such: long flags are never abbreviated."""
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    if not close:
        return ""
    cut = " (flags are not abbreviated)" if close[0].startswith(word) else ""
    return f"did you mean `{close[0]}`?{cut}"


def fail(prog: str, message: str, help_hint: bool = False) -> None:
    """Print ``prog: error: message`` (plus where the flags are listed) and exit with status 2."""
    hint = f"\n(`{prog} --help` lists the flags)" if help_hint else ""
    print(f"{prog}: error: {message}{hint}", file=sys.stderr)
    raise SystemExit(2)


def _check_config_files(parser, argv: list[str]) -> None:
    """Refuse a --config file that is not a mapping, or holds a key that is no setting of ``parser``,
    naming the file and the key (jsonargparse names neither)."""
    import yaml

    keys = {name.lstrip("-").replace("-", "_") for name in _option_names(parser)}
    keys |= {a.dest for a in parser._actions}
    for path in _config_paths(argv):
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            fail(parser.prog, f"--config {path}: {e.strerror or e}")
        except yaml.YAMLError as e:
            fail(parser.prog, f"--config {path}: not valid YAML: {' '.join(str(e).split())}")
        if loaded is None:
            continue
        if not isinstance(loaded, dict):
            fail(parser.prog, f"--config {path}: expected a mapping of settings (key: value), got "
                              f"{type(loaded).__name__}")
        for key in loaded:
            if str(key).replace("-", "_") not in keys:
                close = difflib.get_close_matches(str(key), sorted(keys), n=1, cutoff=0.6)
                fail(parser.prog, f"{path}: unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
                     help_hint=True)


def _config_paths(argv: list[str]) -> list[str]:
    """The --config files named in ``argv``, in order."""
    paths = []
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def _new_parser(prog: str, description: str):
    from jsonargparse import ActionConfigFile

    parser = _parser_class()(prog=prog, description=description, default_env=False, exit_on_error=True,
                             allow_abbrev=False)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the settings below")
    return parser


def _parse(parser, argv: list[str]):
    """``parser.parse_args(argv)`` after checking its --config files' keys."""
    _check_config_files(parser, argv)
    return parser.parse_args(argv)


def dataclass_parser(cls, prog: str):
    """A jsonargparse parser with one flag per field of dataclass ``cls`` and ``--config`` for YAML."""
    parser = _new_parser(prog, (cls.__doc__ or "").strip().splitlines()[0])
    _add_fields(parser, cls)
    return parser


def parse_dataclass(cls, argv: list[str], prog: str):
    """Parse ``argv`` (flags and/or ``--config``) into an instance of dataclass ``cls``."""
    parser = dataclass_parser(cls, prog)
    ns = _parse(parser, argv)
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}
    return cls(**values)

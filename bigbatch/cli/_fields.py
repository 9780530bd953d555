"""Typer commands generated from config dataclasses: one field, one flag, one edit.

A field's flag follows from the field:

* name: ``batch_size`` → ``--batch-size``; a ``dict`` field named ``x_args`` → ``--x-arg``;
* type: ``int``/``float``/``str`` take one value; ``bool`` is ``--x/--no-x``; a list or tuple is
  one comma-separated value (``--batch-sizes 16,32,64``); a ``dict`` is a repeatable
  ``--x-arg key=value`` (values parsed as int, float, bool, none or text) merged into the field;
* help: the field's docstring (the string literal under it, read once from the class's source
  with :mod:`ast`: attribute docstrings do not exist at runtime), its first paragraph, with
  ````other_field```` written as that field's flag, and the field's default.

Every flag defaults to ``None`` = "not given", so a TOML file (``--config``) can fill the
fields and flags override it. A command may rename a flag (``--fsdp/--ddp``, ``-w``) and add
flags that are not fields; the CLI tests list those exceptions.

Library errors name fields (``batch_size must be >= 1, got 0``); :func:`flag_errors` rewrites
them to flags (``--batch-size must be >= 1, got 0``) for errors raised inside bigbatch.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import inspect
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import typer

__all__ = [
    "Flag", "flags_for", "field_docs", "build_command", "parse_flag", "apply_flags", "load_config",
    "config_option", "flag_message", "flag_errors",
]

_PACKAGE_DIR = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Flag:
    """The command-line flag of one config field."""

    field: str
    """The dataclass field it sets."""
    decls: tuple[str, ...]
    """Option declarations given to typer, e.g. ``("--batch-size",)`` or ``("--amp/--no-amp",)``."""
    kind: str
    """``value`` (one int/float/str), ``bool``, ``list`` (comma-separated) or ``dict`` (key=value)."""
    type: Any
    """The value type (``value``) or the element type (``list``); ``tuple`` fields give a tuple."""
    container: type | None
    """``list`` or ``tuple`` for a ``list`` flag, else None."""
    help: str
    """Help text (from the field's docstring)."""

    @property
    def name(self) -> str:
        """The primary long flag, e.g. ``--batch-size`` (what error messages say)."""
        return self.decls[0].split("/")[0]

    def option_names(self) -> list[str]:
        """Every spelling the flag accepts (``--amp``, ``--no-amp``, ``-w``, ...)."""
        return [n for d in self.decls for n in d.split("/")]


# -- docstrings --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Field name → its docstring, for ``cls`` and its dataclass bases (a subclass's doc wins).

    Read with :mod:`ast` from the class's source; a class without source (frozen app, REPL)
    gives empty help rather than an error.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef)), [])
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _help_text(doc: str, flag_of: Mapping[str, str], default: Any, decl: str) -> str:
    """First paragraph of ``doc`` on one line, ``field`` → its flag, then the default."""
    text = " ".join(doc.split("\n\n")[0].split())

    def sub(m: re.Match[str]) -> str:
        return flag_of.get(m.group(1), m.group(1))

    text = re.sub(r"``([^`]+)``", sub, text)
    if default is not None and default != [] and default != {} and default != ():
        shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        if isinstance(default, bool):  # the spelling that is on by default
            on, off = decl.split("/")
            shown = on if default else off
        text += f" [default: {shown}]"
    return text


# -- flags from fields -------------------------------------------------------------------------
def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _kind(name: str, tp: Any) -> tuple[str, Any, type | None]:
    tp = _unwrap_optional(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return "bool", bool, None
    if tp in (int, float, str):
        return "value", tp, None
    if tp is Path:
        return "value", str, None
    if origin in (list, tuple) and args and all(a in (int, float) or a is Ellipsis for a in args):
        elem = float if float in args else int
        return "list", elem, origin
    if origin is dict or tp is dict:
        return "dict", str, None
    raise TypeError(f"config field {name!r} has type {tp!r}, which has no command-line form; "
                    "use int, float, str, bool, a list/tuple of numbers or dict[str, Any]")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def flags_for(
    cls: type,
    *,
    decls: Mapping[str, tuple[str, ...]] | None = None,
    skip: Sequence[str] = (),
    extra_help: Mapping[str, str] | None = None,
) -> list[Flag]:
    """One :class:`Flag` per field of the dataclass ``cls`` (in field order).

    ``decls`` renames flags (field → option declarations), ``skip`` leaves fields out (the test
    of every command lists them), ``extra_help`` appends a sentence to a field's help.
    """
    decls = dict(decls or {})
    extra_help = dict(extra_help or {})
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]
    kinds = {f.name: _kind(f.name, hints[f.name]) for f in fields}

    def default_decls(name: str) -> tuple[str, ...]:
        kind = kinds[name][0]
        flag_name = name[:-1] if kind == "dict" and name.endswith("_args") else name
        long = "--" + flag_name.replace("_", "-")
        return (f"{long}/--no-{long[2:]}",) if kind == "bool" else (long,)

    all_decls = {f.name: tuple(decls.get(f.name, default_decls(f.name))) for f in fields}
    flag_of = {name: d[0].split("/")[0] for name, d in all_decls.items()}
    out = []
    for f in fields:
        kind, tp, container = kinds[f.name]
        help_ = _help_text(docs.get(f.name, ""), flag_of, _default(f), all_decls[f.name][0])
        if kind == "dict":
            help_ += " Repeatable: key=value."
        if f.name in extra_help:
            help_ += " " + extra_help[f.name]
        out.append(Flag(f.name, all_decls[f.name], kind, tp, container, help_.strip()))
    return out


def _annotation(flag: Flag) -> Any:
    if flag.kind == "dict":
        return Optional[list[str]]
    if flag.kind == "list":
        return Optional[str]
    return Optional[flag.type]


def _metavar(flag: Flag) -> str | None:
    if flag.kind == "dict":
        return "KEY=VALUE"
    if flag.kind == "list":
        return "INTS" if flag.type is int else "NUMBERS"
    return None


def build_command(
    flags: Sequence[Flag],
    run: Callable[..., Any],
    *,
    extra: Sequence[inspect.Parameter] = (),
    doc: str = "",
) -> Callable[..., Any]:
    """A typer callback taking one option per flag (plus ``extra`` parameters).

    Typer reads the parameters from the function's signature, so the signature is built from
    the flags. The callback calls ``run(given, **extra_values)`` where ``given`` maps each field
    whose flag was given to its parsed value.
    """
    names = [n for f in flags for n in f.option_names()]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two fields map to the same flag: {', '.join(dup)}")
    params = [
        inspect.Parameter(
            f.field, inspect.Parameter.KEYWORD_ONLY, annotation=_annotation(f),
            default=typer.Option(None, *f.decls, help=f.help, metavar=_metavar(f), show_default=False),
        )
        for f in flags
    ]
    params += list(extra)
    by_field = {f.field: f for f in flags}

    def command(**kwargs: Any) -> Any:
        given = {}
        for name, flag in by_field.items():
            raw = kwargs.pop(name)
            if raw is not None and raw != []:
                given[name] = parse_flag(flag, raw)
        return run(given, **kwargs)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = doc
    return command


# -- values ------------------------------------------------------------------------------------
def parse_flag(flag: Flag, raw: Any) -> Any:
    """The field value for the flag's raw command-line value; bad text names the flag."""
    if flag.kind == "list":
        what, example = ("integers", "16,32,64") if flag.type is int else ("numbers", "0.5,1,2")
        try:
            vals = [flag.type(x) for x in str(raw).split(",") if x.strip()]
        except ValueError:
            vals = []
        if not vals:
            raise ValueError(f"{flag.name} must be a comma-separated list of {what}, e.g. {example}; got {raw!r}")
        return tuple(vals) if flag.container is tuple else vals
    if flag.kind == "dict":
        from bigbatch.workloads import parse_workload_args

        for item in raw:
            if "=" not in item:
                raise ValueError(f"{flag.name} must be key=value, got {item!r}")
        return parse_workload_args(list(raw))
    return raw


def apply_flags(cfg: Any, given: Mapping[str, Any]) -> Any:
    """``cfg`` with the given flags applied: values replace the field, ``key=value`` pairs merge."""
    changes = {}
    for name, value in given.items():
        current = getattr(cfg, name)
        changes[name] = {**current, **value} if isinstance(value, dict) and isinstance(current, dict) else value
    return dataclasses.replace(cfg, **changes)


def load_config(cls: type, path: Path | None, given: Mapping[str, Any]) -> Any:
    """``cls`` from an optional TOML file (``cls.from_toml``) with the given flags applied over it."""
    cfg = cls.from_toml(path) if path is not None else cls()  # type: ignore[attr-defined]
    return apply_flags(cfg, given)


def config_option(what: str) -> inspect.Parameter:
    """The ``--config FILE`` parameter of a command whose fields a TOML file can hold."""
    return inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
        default=typer.Option(None, "--config", help=f"TOML file with {what} fields (top-level keys); flags override it."),
    )


# -- errors ------------------------------------------------------------------------------------
def flag_message(message: str, flags: Sequence[Flag]) -> str:
    """``message`` with the config's field names written as their flags.

    A name with an underscore is replaced wherever it stands as a word; a one-word name
    (``lr``, ``target``) only where it starts the message or a clause, since such words also
    occur as plain English. A field whose flag the message already names is left alone.
    """
    for flag in sorted(flags, key=lambda f: -len(f.field)):
        if re.search(re.escape(flag.name) + r"(?![\w-])", message):
            continue
        word = re.escape(flag.field) + r"(?![\w-])"
        if "_" in flag.field:
            pattern = r"(?<![\w\-.'\"`])" + word
        else:
            pattern = r"(?:^|(?<=; )|(?<=: ))" + word
        message = re.sub(pattern, flag.name, message)
    return message


def _raised_in_bigbatch(exc: BaseException) -> bool:
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    try:
        return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def flag_errors(flags: Sequence[Flag]) -> Iterator[None]:
    """Re-raise a ``ValueError`` (or a missing file) raised inside bigbatch with field names written as flags.

    The same exception object goes on (type and traceback kept); errors raised in the user's
    own code (a workload module) are left as they are.
    """
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        if _raised_in_bigbatch(e) and e.args and isinstance(e.args[0], str) and len(e.args) == 1:
            e.args = (flag_message(e.args[0], flags), *e.args[1:])
        raise

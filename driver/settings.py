"""Settings tables: frozen dataclasses whose fields say what a TOML table accepts.

A settings class declares each key of its table as a field made with
``setting(default, hint=..., check=...)``: the field's annotation is the type
the key accepts, ``check`` a predicate on the value (it may also raise
ValueError, whose text then replaces the hint) and ``hint`` what a good value
looks like. Fields made otherwise are not keys of the table; the caller of
``load`` gives them.

``load`` builds a settings class from one table of a parsed TOML document:
unknown keys are refused with the list of known ones, types are checked (a
bool is never a number; an int is a fine float and becomes one; a list of
strings becomes a tuple), then each check runs. ``check`` runs the same type
checks and checks from a class's ``__post_init__``, so an object built in code
is checked too. Every refusal is one ``SettingsError`` whose message is one
line naming the table, the key, the bad value and the hint::

    bad [driver] transfer_streams = 99 in /etc/coldferry/agent.toml: use 1 to 16

A secret (``setting(..., secret=True)``, read by ``read_secret``) is given
either inline (``token = "..."``) or as a file (``token_file = "..."``),
exactly one. A relative file path is relative to the directory of the
configuration file that names it, not to the current directory, so a
service finds its token wherever it is started from.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Any, TypeVar

from .errors import DriverError

S = TypeVar("S")

_SPEC = "coldferry.setting"


class SettingsError(DriverError):
    """A configuration cannot be used: what is wrong, in which file, and what to write instead."""

    msg = "{problem} in {source}: {hint}"


@dataclass(frozen=True)
class Spec:
    """What a settings field says of its key (kept in the field's metadata)."""

    hint: str
    check: Callable[[Any], object] | None = None
    secret: bool = False
    #: whether errors show the bad value (not for secrets, nor fields kept out of repr)
    shown: bool = True


def setting(default: Any = MISSING, *, hint: str, check: Callable[[Any], object] | None = None,
            secret: bool = False, default_factory: Any = MISSING, repr: bool = True) -> Any:
    """A dataclass field that is a key of the settings table.

    :param default: the value when the table leaves the key out; none makes the key required.
    :param hint: what a good value looks like, shown when a value is refused.
    :param check: called with the typed value; a false result refuses it.
    :param secret: the key may be given as ``<key>_file`` instead (``read_secret``); its value is
        never shown in errors.
    :param default_factory: as for ``dataclasses.field``.
    :param repr: False keeps the value out of ``repr`` and out of error messages.
    """
    return dataclasses.field(default=default, default_factory=default_factory, repr=repr and not secret,
                             metadata={_SPEC: Spec(hint, check, secret, repr and not secret)})


def positive(value: float) -> bool:
    """A check: more than 0."""
    return value > 0


def not_negative(value: float) -> bool:
    """A check: 0 or more."""
    return value >= 0


def one_of(*choices: Any) -> Callable[[Any], bool]:
    """A check: one of ``choices``."""
    return frozenset(choices).__contains__


def read_toml(path: str, what: str, error: type[SettingsError] = SettingsError) -> dict[str, Any]:
    """The parsed TOML file ``path``; ``what`` names its owner in the error (``agent``).

    :raises SettingsError: (or ``error``) the file cannot be read or is not TOML.
    """
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise error(problem=f"cannot read the {what} configuration", source=path, hint=str(e)) from None


def load(cls: type[S], data: Any, table: str, source: str = "configuration", *, base_dir: str | None = None,
         label: str | None = None, error: type[SettingsError] = SettingsError, **given: Any) -> S:
    """A ``cls`` from ``data``, the table ``[table]`` of the configuration file ``source``.

    :param base_dir: where relative secret files are; default the directory of ``source``.
    :param label: how errors name the table, default ``[table]`` (``[[hosts]] entry 2``).
    :param error: the SettingsError subclass to raise.
    :param given: values of the fields that are not keys of the table.
    :raises SettingsError: (or ``error``) a key is unknown, missing or bad, naming it and the fix.
    """
    where = label or f"[{table}]"
    if base_dir is None:
        base_dir = os.path.dirname(os.path.abspath(source))
    if not isinstance(data, dict):
        raise error(problem=f"{where} is not a table", source=source, hint=f"write [{table}] above its settings")
    specs = _specs(cls)
    known = sorted(k for name, (spec, _) in specs.items() for k in (name, f"{name}_file")[:1 + spec.secret])
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise error(problem=f"{where} has unknown key(s) {', '.join(unknown)}", source=source,
                    hint=f"the known keys are {', '.join(known)}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in specs:
            continue
        spec, kind = specs[f.name]
        required = f.default is MISSING and f.default_factory is MISSING
        if spec.secret:
            secret = read_secret(where, f.name, data, source, base_dir, required=required, hint=spec.hint,
                                 error=error)
            if secret is not None:
                values[f.name] = secret
        elif f.name in data:
            values[f.name] = _checked(f.name, spec, kind, data[f.name], where, source, error)
        elif required:
            raise error(problem=f"{where} is missing {f.name}", source=source, hint=spec.hint)
    try:
        return cls(**values, **given)
    except SettingsError as e:  # a check of __post_init__ names no file: name it
        raise error(**{**vars(e), "source": source}) from None


def check(obj: Any, table: str, error: type[SettingsError] = SettingsError) -> None:
    """Check every setting of the settings object ``obj`` (from its ``__post_init__``); an int
    given for a float becomes a float and a list a tuple, in place.

    :raises SettingsError: (or ``error``) naming ``[table]``, the key and the fix.
    """
    source = f"{type(obj).__name__}()"
    for name, (spec, kind) in _specs(type(obj)).items():
        if not spec.secret:
            value = _checked(name, spec, kind, getattr(obj, name), f"[{table}]", source, error)
            object.__setattr__(obj, name, value)  # frozen: the typed value replaces the given one


def read_secret(table: str, key: str, data: dict[str, Any], source: str, base_dir: str | None = None, *,
                required: bool = True, hint: str = "", error: type[SettingsError] = SettingsError) -> str | None:
    """The secret ``key`` of ``data``, given inline or read from the file ``<key>_file``, stripped.

    :param table: how errors name the table (``[agent]``).
    :param source: the configuration file, named in errors.
    :param base_dir: the directory a relative ``<key>_file`` is relative to: the configuration
        file's own directory (the current directory when None).
    :param required: whether a table with neither key is refused; else None is returned.
    :param hint: what the secret is for, shown in errors.
    :raises SettingsError: (or ``error``) both keys or (if required) neither are set, the inline
        value is empty, or the file cannot be read or is empty.
    """
    file_key = f"{key}_file"
    fix = f"set exactly one: {key} = \"...\" or {file_key} = \"/path\"" + (f" ({hint})" if hint else "")
    if key in data and file_key in data:
        raise error(problem=f"{table} has both {key} and {file_key}", source=source, hint=fix)
    if key not in data and file_key not in data:
        if not required:
            return None
        raise error(problem=f"{table} has neither {key} nor {file_key}", source=source, hint=fix)
    if key in data:
        value = data[key]
        if not isinstance(value, str) or not value.strip():
            raise error(problem=f"bad {table} {key}", source=source, hint=f"a non-empty string; {fix}")
        return value.strip()
    path = data[file_key]
    if not isinstance(path, str) or not path:
        raise error(problem=f"bad {table} {file_key} = {path!r}", source=source,
                    hint=f"the path of a file holding the {key}")
    return read_secret_file(path, f"{table} {file_key}", source, base_dir, key=key, error=error)


def read_secret_file(path: str, what: str, source: str, base_dir: str | None = None, *, key: str = "token",
                     error: type[SettingsError] = SettingsError) -> str:
    """The stripped content of the secret file ``path`` (relative to ``base_dir``, else the
    current directory; ``~`` expanded).

    :param what: how errors name the setting or option (``[agent] token_file``, ``--token-file``).
    :raises SettingsError: (or ``error``) the file cannot be read or is empty.
    """
    path = os.path.join(base_dir or os.getcwd(), os.path.expanduser(path))
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except OSError as e:
        raise error(problem=f"{what}: cannot read {path}", source=source, hint=e.strerror or str(e)) from None
    if not value:
        raise error(problem=f"{what}: {path} is empty", source=source, hint=f"write the {key} into it")
    return value


@functools.cache
def _specs(cls: type) -> dict[str, tuple[Spec, Any]]:
    """Each settings field of ``cls``: its Spec and its resolved annotation."""
    hints = typing.get_type_hints(cls)
    return {f.name: (f.metadata[_SPEC], hints[f.name])
            for f in dataclasses.fields(cls) if _SPEC in f.metadata}


def _checked(name: str, spec: Spec, kind: Any, value: Any, where: str, source: str,
             error: type[SettingsError]) -> Any:
    """``value`` of key ``name`` as its type ``kind``, if it is of that type and passes the check."""
    typed, ok = _typed(value, kind)
    hint = spec.hint
    if not ok:
        hint = f"expected {_words(kind)}, {hint}"
    elif spec.check is not None:
        try:
            ok = bool(spec.check(typed))
        except ValueError as e:
            ok, hint = False, str(e)
    if not ok:
        shown = f"bad {where} {name} = {value!r}" if spec.shown else f"bad {where} {name}"
        raise error(problem=shown, source=source, hint=hint)
    return typed


def _typed(value: Any, kind: Any) -> tuple[Any, bool]:
    """``value`` as ``kind`` and whether it fits: str, int, float, bool, ``X | None`` or
    ``tuple[str, ...]``. A bool is never a number; an int becomes a float, a list a tuple."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value), True
    if isinstance(value, bool) and kind is not bool:
        return value, kind is Any
    args = typing.get_args(kind)
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None, type(None) in args
        return _typed(value, next(a for a in args if a is not type(None)))
    if origin is tuple:
        items = tuple(value) if isinstance(value, (list, tuple)) else None
        return (items, True) if items is not None and all(isinstance(v, args[0]) for v in items) else (value, False)
    return value, isinstance(value, kind)


_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _words(kind: Any) -> str:
    """The type ``kind`` in an error message."""
    if typing.get_origin(kind) is tuple:
        return f"a list of {_WORDS[typing.get_args(kind)[0]].split()[-1]}s"
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_WORDS.get(a, "nothing") for a in typing.get_args(kind) if a is not type(None))
    return _WORDS.get(kind, str(kind))

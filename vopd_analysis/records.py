"""The files the project writes and reads back, and the paths it writes to, checked in one place.

Reading: a run's ``config.json``, ``summary.json``, ``inputs.json`` and ``metrics.jsonl``, a
checkpoint's ``manifest.json`` and metrics rows, a pair's ``card.json``. ``read_json`` parses
one file and ``check_fields`` checks the fields of the object it holds; every problem (missing,
not JSON, a missing field, a field of the wrong type, an unknown field) is one ``InputError``
line naming the file and the field, so damaged metadata never ends in a traceback.

Resuming: ``store_result`` keeps one unit of a long computation (a probe batch) with the settings it was
computed with, ``read_stored_result`` reads it back, refusing one computed with other settings, and
``stored_or_computed`` does both around the computation.

Writing: ``write_json_atomic`` writes a file a reader never sees half-written; ``check_output`` refuses, before any work starts, an output path that cannot be
written: empty (an unset shell variable), a folder where a file is meant or the reverse, below
a file, not writable, or impossible (a name too long). Missing parent folders are fine: the
writer creates them.

Kinds are Python types as ``json`` returns them, or tuples of them (``(dict, type(None))``: an
object or null); an int is a number (a float field), a bool is not an int.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import InputError

KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a JSON object",
         list: "a JSON array", type(None): "null"}
ROW = {"kind": str, "step": int}       # what every metrics row has (metrics.jsonl, a checkpoint's rows)


def is_kind(value, kind) -> bool:
    """Whether the JSON value ``value`` is of ``kind`` (a type or a tuple of types).

    Args:
      value: a value from ``json.loads``.
      kind: ``bool``, ``int``, ``float`` (any number), ``str``, ``dict``, ``list``, ``type(None)``,
        or a tuple of them.
    Returns:
      True or False (True and False are not integers or numbers).
    """
    if isinstance(kind, tuple):
        return any(is_kind(value, k) for k in kind)
    if isinstance(value, bool) and kind in (int, float):
        return False
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def describe(kind) -> str:
    """``kind`` in words: ``(dict, type(None))`` -> "a JSON object or null"."""
    return " or ".join(KINDS.get(k, k.__name__) for k in (kind if isinstance(kind, tuple) else (kind,)))


def short(value, width: int = 60) -> str:
    """A value as JSON text, cut to ``width`` characters (for one-line errors)."""
    text = json.dumps(value) if is_kind(value, (bool, int, float, str, dict, list, type(None))) else repr(value)
    return text if len(text) <= width else text[:width] + "..."


def read_json(path, what: str, kind=dict):
    """The JSON value in the file ``path``.

    Args:
      path: the file.
      what: what the file is, for messages ("the run's config").
      kind: what the file must hold (default a JSON object).
    Returns:
      The parsed value.
    Raises:
      InputError: one line naming the file: missing, unreadable, not UTF-8, not JSON (with line and
        column), or not of ``kind``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what} {path} is missing") from None
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
        raise InputError(f"cannot read {what} {path}: {reason}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{what} {path} is not JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not is_kind(value, kind):
        raise InputError(f"{what} {path} must hold {describe(kind)}, not {describe(type(value))}")
    return value


def check_fields(record: dict, where, kinds: dict, required=(), closed: bool = False) -> dict:
    """Check the fields of a JSON object.

    Args:
      record: the object.
      where: where it came from, starting each message (a file, ``file:line``).
      kinds: {field: kind}; a field present must be of its kind.
      required: the fields that must be present.
      closed: True: a field outside ``kinds`` is an error (a hand-made key, or a file of another program).
    Returns:
      ``record``.
    Raises:
      InputError: "WHERE: field 'NAME' is missing", "... must be KIND, got VALUE", "... unknown field 'NAME'".
    """
    for name in required:
        if name not in record:
            raise InputError(f"{where}: field '{name}' is missing")
    for name, value in record.items():
        if name not in kinds:
            if closed:
                raise InputError(f"{where}: unknown field '{name}'")
        elif not is_kind(value, kinds[name]):
            raise InputError(f"{where}: field '{name}' must be {describe(kinds[name])}, got {short(value)}")
    return record


def read_record(path, what: str, kinds: dict, required=(), closed: bool = False) -> dict:
    """``read_json`` of a JSON object, then ``check_fields`` on it."""
    return check_fields(read_json(path, what), path, kinds, required, closed)


def check_rows(rows: list, where) -> list:
    """Metrics rows (a run's, a checkpoint's): each a JSON object with ``kind`` (string) and ``step``
    (integer); returns ``rows``, else ``InputError`` naming ``where`` and the row."""
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise InputError(f"{where}: row {i} must be a JSON object, got {short(row)}")
        check_fields(row, f"{where}: row {i}", ROW, required=ROW)
    return rows


def read_rows(path) -> list:
    """The rows of a ``metrics.jsonl`` (one JSON object a line, blank lines skipped); a last line cut off
    by an interruption is left out. Every other problem is an ``InputError`` naming ``file:line``."""
    path = Path(path)
    try:
        lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read metrics {path}: {getattr(err, 'strerror', None) or 'not UTF-8 text'}") from None
    rows = []
    for i, (lineno, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break                                  # the last line, cut off mid-write
            raise InputError(f"{path}:{lineno}: not JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{lineno}: must be a JSON object, got {short(row)}")
        rows.append(check_fields(row, f"{path}:{lineno}", ROW, required=ROW))
    return rows


def check_output(path, option: str, folder: bool = False) -> Path:
    """Refuse an output path that cannot be written, before any work.

    Args:
      path: the path as given (a string: an empty one is refused, ``Path("")`` would be ".").
      option: the option that gave it ("--out", "--csv"), starting each message.
      folder: the output is a folder (else a file).
    Returns:
      The path as a ``Path``.
    Raises:
      InputError: empty; a file where a folder is meant or the reverse; an existing path or the nearest
        existing parent not writable; a parent that is a file; a path the system cannot hold.
    """
    if not str(path).strip():
        raise InputError(f"{option} is empty (an unset shell variable?); give a path")
    path = Path(path)
    want, other = ("folder", "file") if folder else ("file", "folder")
    try:
        if path.exists():
            if path.is_dir() != folder:
                raise InputError(f"{option} {path} is a {other}, not a {want}; choose another {option}")
            probe = path
        else:
            probe = path.parent
            while not probe.exists() and probe != probe.parent:
                probe = probe.parent
            if not probe.is_dir():
                raise InputError(f"{option} {path}: {probe} is a file, so the {want} cannot be made; "
                                 f"choose another {option}")
        if not os.access(probe, os.W_OK | (os.X_OK if probe.is_dir() else 0)):
            raise InputError(f"{option} {path} is not writable ({probe}: permission denied); choose another {option}")
    except InputError:
        raise
    except (OSError, ValueError) as err:         # a name too long, a NUL byte: the system cannot hold it
        raise InputError(f"{option} {path} cannot be written: {getattr(err, 'strerror', None) or err}") from None
    return path


def write_json_atomic(path, obj) -> None:
    """Write ``obj`` as JSON through a temporary file and ``os.replace``: a reader sees the old file
    or the complete new one, never a half-written one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def json_key(settings: dict) -> dict:
    """``settings`` as JSON values (anything else as text), so that a key read back from a file compares equal."""
    return json.loads(json.dumps(settings, default=str))


def store_result(path, key: dict, result: dict) -> None:
    """Keep ``result`` (JSON values) with the settings ``key`` it was computed with, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"key": json_key(key), "result": result})


def read_stored_result(path, key: dict, what: str):
    """The result ``store_result`` kept in ``path``, or None when there is none.

    Raises:
      InputError: one line naming the file and the settings that differ when it was computed with other
        settings than ``key`` (a folder of stored results holds one configuration's).
    """
    path = Path(path)
    if not path.exists():
        return None
    stored = read_json(path, what)
    old, new = stored.get("key"), json_key(key)
    if old != new or "result" not in stored:
        old = old if isinstance(old, dict) else {}
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise InputError(f"{path} was computed with other settings ({', '.join(differ) or 'no key stored'}); "
                         "give another work folder or remove that one")
    return stored["result"]


def stored_or_computed(path, key: dict, what: str, compute):
    """The result kept in ``path`` for the settings ``key`` (``read_stored_result``), else ``compute()``
    (JSON values), kept there first (``store_result``): a killed computation resumes after its last unit."""
    stored = read_stored_result(path, key, what)
    if stored is None:
        stored = compute()
        store_result(path, key, stored)
    return stored

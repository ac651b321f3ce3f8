"""Reading the small user files the tools take (text to score or calibrate on, rules, prompts, a model's JSON
files): checked, with one-line errors that name the flag, argument or file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from afpq_jax._src.errors import CheckpointError, InputError, InputNotFoundError


def require_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a `Path` if it is an existing file; else `InputNotFoundError` / `InputError` naming ``what``."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{what} {p} is a directory; pass a file")
    if not p.is_file():
        raise InputNotFoundError(f"{what} {p} does not exist")
    return p


def read_text(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of the file ``path`` (a byte-order mark is dropped); `InputError` if it is not UTF-8."""
    p = require_file(path, what)
    data = p.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        if data.startswith((b"\xff\xfe", b"\xfe\xff")) and _decodes(data, "utf-16"):  # PowerShell's > writes it
            raise InputError(f"{what} {p} is UTF-16 text; save it as UTF-8 (e.g. iconv -f utf-16 -t utf-8)") from None
        raise InputError(f"{what} {p} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None


def _decodes(data: bytes, encoding: str) -> bool:
    try:
        data.decode(encoding)
    except UnicodeDecodeError:
        return False
    return True


def read_json_object(path: str | os.PathLike, what: str | None = None) -> dict:
    """The JSON object in ``path`` (a model's or checkpoint's own file); `CheckpointError` naming the file if it
    is missing, not JSON or not an object."""
    p = Path(path)
    name = what or str(p)
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{name} is missing; restore it (or convert / download the model again)") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{name} is not UTF-8 text ({e.reason} at byte {e.start}); restore the file") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{name} is not valid JSON ({e.msg} at line {e.lineno}); restore the file") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{name} must be a JSON object, got {json_kind(data)}; restore the file")
    return data


def json_kind(value) -> str:
    """What a parsed JSON value is, in JSON's words (for messages)."""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), "a number")

"""The one JSON-file reader: every failure is an InputFileError naming the file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rebasin.errors import InputFileError


def read_json(path: str | Path, *, what: str = "JSON file") -> dict[str, Any]:
    """Parse a JSON file whose top level is an object.

    ``what`` names the file's role in the message (``config``, ``adapter config``, ...).
    Raises InputFileError, with the path and one line saying what is wrong, when the file
    is missing, unreadable, not UTF-8, not valid JSON, or not a JSON object.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputFileError(f"{what} not found", file=path) from None
    except UnicodeDecodeError:
        raise InputFileError(f"{what} is not UTF-8 text", file=path) from None
    except OSError as exc:
        raise InputFileError(f"cannot read {what}: {exc.strerror or exc}", file=path) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputFileError(f"{what} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
                             file=path) from None
    if not isinstance(data, dict):
        raise InputFileError(f"{what} is not a JSON object (top level is {type(data).__name__})", file=path)
    return data

"""JSON files the library reads and writes: clear errors naming the file, atomic writes."""

from __future__ import annotations

import json
import os
import tempfile


def read_json(path, error=ValueError, what: str = "file"):
    """Parses ``path``; a missing or corrupt file raises ``error`` with the path and what was expected."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: corrupt JSON ({e})") from None


def write_json_atomic(path, obj, indent: int = 2, default=None) -> str:
    """Writes ``obj`` to a temporary sibling and renames it into place: a reader never sees half a file."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent, default=default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path

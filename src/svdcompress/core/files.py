"""Atomic file writes and strict JSON reads: a crash never leaves a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import FormatError


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: dict) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


def read_json(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FormatError(f"{path} is not valid JSON: {err}") from None
    except OSError as err:
        raise FormatError(f"cannot read {path}: {err.strerror}") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path} must hold a JSON object")
    return data

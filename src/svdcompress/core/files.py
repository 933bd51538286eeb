"""Atomic writes of files and of whole directories, file hashes, strict JSON reads: a crash
never leaves a half-written file or run directory."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import FormatError, SVDCompressError


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
        os.chmod(tmp, 0o666 & ~umask)  # again: some writers replace the file
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
    except (ValueError, RecursionError) as err:  # bad JSON, a 5,000-digit number, deep nesting
        raise FormatError(f"{path} is not valid JSON: {str(err)[:200]}") from None
    except OSError as err:
        raise FormatError(f"cannot read {path}: {err.strerror}") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path} must hold a JSON object")
    return data


# ---------------------------------------------------------------- whole-directory writes

class RunExists(SVDCompressError, FileExistsError):
    """The destination already holds something, and replacing it was not asked for."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _within(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or inside it (both resolved)."""
    return a == b or b in a.parents


def check_destination(dest: str | Path, *, overwrite: bool = False, sources=()) -> None:
    """Refuse to write a run over one of its ``sources`` (the source itself, a directory
    holding it, or one inside it: always), over a symbolic link, a file, or an existing
    non-empty directory unless ``overwrite``. Call it before the work and again before the
    swap."""
    dest = Path(dest)
    if dest.is_symlink():
        raise RunExists(f"{dest} is a symbolic link: give the directory itself")
    real = dest.resolve()
    if real == real.parent:
        raise RunExists(f"{dest} is a filesystem root: give a directory to write the run to")
    for src in sources:
        if src is None:
            continue
        src = Path(src).resolve()
        if _within(src, real) or _within(real, src):
            raise RunExists(f"the output {dest} is, holds or lies inside the source {src}: "
                            "write to another directory")
    if dest.exists() and not dest.is_dir():
        raise RunExists(f"{dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise RunExists(f"{dest} already exists and is not empty: pass --overwrite "
                        "(overwrite=True) to replace it")


def check_output_file(path: str | Path, *, overwrite: bool = False, run: str | Path | None = None) -> None:
    """A results file may replace an existing file only with ``overwrite``, and never one of
    a run's own files (svdcompress.json and the files it lists)."""
    path = Path(path)
    if run is not None and path.resolve().parent == Path(run).resolve():
        meta = Path(run) / "svdcompress.json"
        names = {"svdcompress.json"}
        try:
            names |= set(json.loads(meta.read_text()).get("files", {}))
        except (OSError, ValueError, AttributeError):
            pass
        if path.name in names:
            raise RunExists(f"{path} is one of the run's own files: write the results elsewhere")
    if path.is_dir() or (path.exists() and not overwrite):
        raise RunExists(f"{path} already exists: pass --overwrite to replace it")


_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd = -100
    return fn(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _stale_stages(dest: Path):
    """Staging directories of ``dest`` left by processes that no longer run."""
    for p in dest.parent.glob(f".{dest.name}.staging-*"):
        try:
            pid = int(p.name.split("staging-", 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
        except (ValueError, IndexError, ProcessLookupError):
            yield p
        except PermissionError:
            pass  # another user's live process


def _fsync_tree(root: Path) -> None:
    for path in [*root.iterdir(), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def staged_directory(dest: str | Path, *, overwrite: bool = False):
    """Build a directory beside ``dest`` and move it into place only when the block ends
    without error, replacing ``dest`` in one atomic step: a crash at any moment leaves the
    old complete ``dest`` (or none) or the new complete one, never a mix."""
    check_destination(dest, overwrite=overwrite)
    dest = Path(dest).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale_stages(dest):
        shutil.rmtree(stale, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.staging-{os.getpid()}-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(stage, 0o777 & ~umask)
    try:
        yield stage
        for p in stage.iterdir():  # the usual permissions, whatever the writer used
            os.chmod(p, 0o666 & ~umask)
        _fsync_tree(stage)
        check_destination(dest, overwrite=overwrite)  # it may have appeared meanwhile
        if not dest.exists():
            os.rename(stage, dest)
        elif _exchange(stage, dest):
            shutil.rmtree(stage)  # it now holds the old directory
        else:  # no atomic swap here: move the old one aside first (a short window)
            old = dest.with_name(f".{dest.name}.staging-{os.getpid()}-old")
            os.rename(dest, old)
            os.rename(stage, dest)
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise

"""Atomic output: every file is written under a temporary name in its final folder and renamed when complete.

A reader therefore never sees a truncated file under a final name, whatever
kills the writer (``os.replace`` is atomic on POSIX within one file system).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def temporary_prefix(final_path: Path) -> str:
    """The start of every temporary name for ``final_path``: ``.<final name>.<writer pid>.``.

    ``mkstemp``/``mkdtemp`` add 8 random characters and the ``.tmp[suffix]`` ending. The pid lets
    ``remove_stale_temporaries`` tell a killed writer's leftover from a live writer's file.
    """
    return f".{final_path.name}.{os.getpid()}."


# ``.<final name>.<pid>.<8 mkstemp characters>.tmp[.<extension>]``: nothing else is ever removed.
_TEMPORARY_NAME = re.compile(r"^\.(?P<final>.+)\.(?P<pid>[0-9]+)\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(folder: str | Path, final_name: str | None = None) -> list[Path]:
    """Delete the temporary files / folders in ``folder`` that a killed writer of this module left.

    Only names of this module's pattern (``temporary_prefix`` + 8 characters + ``.tmp[.ext]``) whose
    writer process no longer exists are removed, and with ``final_name`` only those for that output.
    A live writer's temporary (a concurrent run, a pid of this process) is left alone, and so is every
    other file. Returns what was removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for candidate in sorted(folder.iterdir()):
        match = _TEMPORARY_NAME.match(candidate.name)
        if match is None or (final_name is not None and match["final"] != final_name):
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _process_alive(pid):
            continue
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


@contextlib.contextmanager
def atomic_path(final_path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final_path``; rename it over ``final_path`` on success.

    On any exception the temporary file is removed and ``final_path`` is left as it was.
    ``suffix`` keeps an extension for writers that look at it (e.g. ``.png``).
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(prefix=temporary_prefix(final_path), suffix=f".tmp{suffix}",
                                              dir=final_path.parent)
    os.close(handle)
    temporary_path = Path(temporary_name)
    try:
        yield temporary_path
        if temporary_path.exists():
            os.chmod(temporary_path, 0o666 & ~_umask())  # mkstemp made it 0o600
        os.replace(temporary_path, final_path)
    except BaseException as error:
        temporary_path.unlink(missing_ok=True)
        if isinstance(error, OSError):  # e.g. ENOSPC: the OS error does not say which output failed
            error.add_note(f"while writing {final_path} (left as it was)")
        raise


@contextlib.contextmanager
def atomic_dir(final_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``final_dir``; it replaces ``final_dir`` whole on success."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    temporary_dir = Path(tempfile.mkdtemp(prefix=temporary_prefix(final_dir), suffix=".tmp", dir=final_dir.parent))
    try:
        yield temporary_dir
        os.chmod(temporary_dir, 0o777 & ~_umask())  # mkdtemp made it 0o700
        if final_dir.exists():
            old_dir = final_dir.with_name(f".{final_dir.name}.old")
            shutil.rmtree(old_dir, ignore_errors=True)
            os.replace(final_dir, old_dir)
            os.replace(temporary_dir, final_dir)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            os.replace(temporary_dir, final_dir)
    except BaseException as error:
        shutil.rmtree(temporary_dir, ignore_errors=True)
        if isinstance(error, OSError):
            error.add_note(f"while writing {final_dir} (not replaced)")
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON atomically."""
    with atomic_path(path) as temporary_path:
        temporary_path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as temporary_path:
        temporary_path.write_text(text)


def sha256_of_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()

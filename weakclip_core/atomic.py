"""Atomic output: every file is written under a temporary name in its final folder and renamed when complete.

A reader therefore never sees a truncated file under a final name, whatever
kills the writer (``os.replace`` is atomic on POSIX within one file system).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
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


@contextlib.contextmanager
def atomic_path(final_path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final_path``; rename it over ``final_path`` on success.

    On any exception the temporary file is removed and ``final_path`` is left as it was.
    ``suffix`` keeps an extension for writers that look at it (e.g. ``.png``).
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(prefix=f".{final_path.name}.", suffix=f".tmp{suffix}",
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
    temporary_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.", suffix=".tmp", dir=final_dir.parent))
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

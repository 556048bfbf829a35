"""Atomic output: every file is written under a temporary name in its final folder and renamed when complete.

A reader therefore never sees a truncated file under a final name, whatever
kills the writer (``os.replace`` is atomic on POSIX within one file system).

Every writer first removes what a killed writer of the *same final name* left behind (a temporary whose
writer process is gone, :func:`remove_stale_temporaries`), so a stage re-run directly (not through a
pipeline runner that clears its outputs first) cleans up after a kill. A live process's temporary is never removed.

A folder that :func:`atomic_dir` replaces whole is checked first (:func:`check_output_dir`): it must not be,
or contain, a folder the stage reads or the project folder, and an existing folder must hold only what the
stage writes there (:class:`FolderContents`); anything else would be deleted by the replacement, so it
raises :class:`OutputFolderError` before any work is lost. An output folder that is a symbolic link is written
through the link: the new folder is built beside the link's target and replaces the target; the link stays.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weakclip_core.errors import InputError


def umask() -> int:
    """The process umask (read by setting and restoring it): what a file written in place would get."""
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


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (another user's counts: signalling it is refused, not failed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_if_stale(candidate: Path, pid: int) -> bool:
    """Delete ``candidate`` (a temporary of writer ``pid``) when that writer is gone; True when removed."""
    if pid == os.getpid() or process_alive(pid):
        return False
    if candidate.is_dir() and not candidate.is_symlink():
        shutil.rmtree(candidate, ignore_errors=True)
    else:
        candidate.unlink(missing_ok=True)
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
        if _remove_if_stale(candidate, int(match["pid"])):
            removed.append(candidate)
    return removed


# Each writer lists its folder to find a killed writer's temporaries. A folder holding many entries (a work
# folder of thousands of masks) is listed at most once a second per process, so writing N files into it
# costs O(N) listings' worth, not O(N^2); a small folder is listed at every write.
_BIG_FOLDER_ENTRIES = 1000
_RELIST_BIG_FOLDER_S = 1.0
_listings: dict[str, tuple[float, int, dict[str, list[str]]]] = {}


def _temporary_names_by_final(folder: Path) -> dict[str, list[str]]:
    """``{final name: [temporary names]}`` of the temporaries in ``folder`` (any writer; listed or cached)."""
    key = os.path.abspath(folder)
    now = time.monotonic()
    cached = _listings.get(key)
    if cached is not None and cached[1] >= _BIG_FOLDER_ENTRIES and now - cached[0] < _RELIST_BIG_FOLDER_S:
        return cached[2]
    by_final: dict[str, list[str]] = {}
    n_entries = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                n_entries += 1
                if entry.name.startswith(".") and (match := _TEMPORARY_NAME.match(entry.name)):
                    by_final.setdefault(match["final"], []).append(entry.name)
    except OSError:  # no folder yet (or unreadable): nothing to clean
        return {}
    _listings[key] = (now, n_entries, by_final)
    return by_final


def remove_own_stale_temporaries(final_path: str | Path) -> list[Path]:
    """Before writing ``final_path``: delete the temporaries of that same name whose writer process is gone.

    Best effort: a failure to list or delete never stops the write. Returns what was removed.
    """
    final_path = Path(final_path)
    removed = []
    try:
        for name in _temporary_names_by_final(final_path.parent).get(final_path.name, []):
            match = _TEMPORARY_NAME.match(name)
            candidate = final_path.parent / name
            if match is not None and os.path.lexists(candidate) and _remove_if_stale(candidate, int(match["pid"])):
                removed.append(candidate)
    except OSError:
        pass
    return removed


@contextlib.contextmanager
def atomic_path(final_path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final_path``; rename it over ``final_path`` on success.

    On any exception the temporary file is removed and ``final_path`` is left as it was. A killed earlier
    writer's temporary of the same name is removed first (:func:`remove_own_stale_temporaries`).
    ``suffix`` keeps an extension for writers that look at it (e.g. ``.png``).
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    remove_own_stale_temporaries(final_path)
    handle, temporary_name = tempfile.mkstemp(prefix=temporary_prefix(final_path), suffix=f".tmp{suffix}",
                                              dir=final_path.parent)
    os.close(handle)
    temporary_path = Path(temporary_name)
    try:
        yield temporary_path
        if temporary_path.exists():
            os.chmod(temporary_path, 0o666 & ~umask())  # mkstemp made it 0o600
        os.replace(temporary_path, final_path)
    except BaseException as error:
        temporary_path.unlink(missing_ok=True)
        if isinstance(error, OSError):  # e.g. ENOSPC: the OS error does not say which output failed
            error.add_note(f"while writing {final_path} (left as it was)")
        raise


# --------------------------------------------------------------------------- folders replaced whole

class OutputFolderError(InputError):
    """A folder a stage would replace whole holds something the stage does not write, or something it reads
    (an input, the project folder): the replacement would delete it. The message names the folder, one
    offending entry and, when the folder comes from params, the key."""


@dataclass(frozen=True)
class FolderContents:
    """What a stage writes into a folder that :func:`atomic_dir` replaces whole: everything else is *foreign*.

    ``files``: ``fnmatch`` patterns of the files at this level (a link to a file counts as a file);
    ``folders``: ``(name pattern, contents)`` of the sub-folders, each described the same way. An existing
    folder with any other entry (or a file where a folder is expected, or the reverse) is refused.
    """

    files: tuple[str, ...] = ()
    folders: tuple[tuple[str, FolderContents], ...] = ()

    def _owns_file(self, name: str) -> bool:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.files):
            return True
        match = _TEMPORARY_NAME.match(name)  # a temporary of an owned file: the stage's own
        return match is not None and any(fnmatch.fnmatchcase(match["final"], pattern) for pattern in self.files)

    def _folder_contents(self, name: str) -> FolderContents | None:
        for pattern, contents in self.folders:
            if fnmatch.fnmatchcase(name, pattern):
                return contents
        return None

    def foreign_entry(self, folder: str | Path) -> Path | None:
        """The first entry under ``folder`` (sorted, depth first) that this description does not own, or None."""
        folder = Path(folder)
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        for entry in entries:
            if entry.is_dir():  # follows links: a link to a folder is a folder
                contents = self._folder_contents(entry.name)
                if contents is None:
                    return folder / entry.name
                inner = contents.foreign_entry(folder / entry.name)
                if inner is not None:
                    return inner
            elif not self._owns_file(entry.name):
                return folder / entry.name
        return None


ANY_FILES = FolderContents(files=("*",))
"""The default of :func:`atomic_dir`: files of any name, no sub-folder."""

PROJECT_MARKERS = ("params.yaml", "dvc.yaml", ".dvc", ".git")
"""Entries that make a folder a project folder: an output folder never holds one of them."""


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_dir(final_dir: str | Path, contents: FolderContents = ANY_FILES, *, key: str | None = None,
                     reads: Mapping[str, str | Path | None] | None = None) -> Path:
    """Refuse (``OutputFolderError``) a folder that replacing whole would lose inputs or foreign files from.

    ``final_dir`` (symlinks followed) must not be, or contain, the project folder (the working directory) or
    any of ``reads`` (``{what: path}``: the folders and files the stage reads, e.g.
    ``{"dataset.prepared_dir": ...}``); must not lie inside a folder of ``reads`` either (a folder of the
    user's dataset such as ``<dataset.source>/images`` holds only files the stage might write, ``*.png``, and
    would be replaced by them; an output inside an input is also an input that changes under DVC); must not
    hold a project marker (``params.yaml``, ``dvc.yaml``, ``.git``);
    must be a folder when it exists; and must hold nothing but ``contents``. ``key`` (the params key that
    chose the folder) starts the message. Returns the folder the replacement will act on (the link's target
    for a link).
    """
    given = Path(final_dir)
    prefix = f"{key}: " if key else ""
    target = given.resolve()
    given_reads = {what: Path(path) for what, path in (reads or {}).items() if path is not None and str(path) != ""}
    for what, path in {"the project folder": Path.cwd(), **given_reads}.items():
        resolved = path.resolve()
        if _is_within(resolved, target):
            relation = "is" if resolved == target else "contains"
            raise OutputFolderError(
                f"{prefix}{given} {relation} {path} ({what}), which this stage reads; the stage replaces this "
                "folder whole when it finishes, which would delete it: choose a folder of its own")
    project = Path.cwd().resolve()
    for what, path in given_reads.items():  # every output lies inside the project folder: only the reads count
        resolved = path.resolve()
        holds_the_project = _is_within(project, resolved)  # a project cloned inside the dataset's folder: its
        # outputs lie there too, so only outputs outside the project count for that folder
        if resolved.is_dir() and _is_within(target, resolved) and not (holds_the_project
                                                                       and _is_within(target, project)):
            raise OutputFolderError(
                f"{prefix}{given} is inside {path} ({what}), which this stage reads; the stage replaces this "
                "folder whole when it finishes, which would delete what is there, and would change its own "
                "input: choose a folder outside it")
    if not target.exists():
        return target
    if not target.is_dir():
        raise OutputFolderError(f"{prefix}{given} is a file, not a folder; the stage writes a folder there: "
                                "move the file or choose another folder")
    for marker in PROJECT_MARKERS:
        if (target / marker).exists() or (target / marker).is_symlink():
            raise OutputFolderError(
                f"{prefix}{given} holds {marker}: it is a project folder, and the stage replaces its output "
                "folder whole when it finishes, which would delete the project: choose a folder of its own")
    foreign = contents.foreign_entry(target)
    if foreign is not None:
        entry = foreign.relative_to(target)
        kind = "/" if foreign.is_dir() else ""
        raise OutputFolderError(
            f"{prefix}{given} holds {entry}{kind}, which this stage does not write; the stage replaces this folder "
            "whole when it finishes, which would delete it: move it away or choose an empty folder")
    return target


def _remove_previous(old_dir: Path) -> None:
    """Delete ``.<name>.old``: a folder, or a link / file left by an earlier version (never follow a link)."""
    if old_dir.is_symlink() or old_dir.is_file():
        old_dir.unlink(missing_ok=True)
    else:
        shutil.rmtree(old_dir, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final_dir: str | Path, contents: FolderContents = ANY_FILES, *, key: str | None = None,
               reads: Mapping[str, str | Path | None] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``final_dir``; it replaces ``final_dir`` whole on success.

    ``contents`` is what the stage writes there: before yielding, and again just before the swap,
    :func:`check_output_dir` refuses a folder holding anything else (or being / containing the project folder
    or ``reads``), so the replacement never deletes what the stage does not own. A ``final_dir`` that is a
    symbolic link is written through: the new folder is built beside the link's target and replaces the target,
    and the link stays. A killed earlier writer's temporary folder of the same name is removed first.
    """
    given = Path(final_dir)
    target = check_output_dir(given, contents, key=key, reads=reads)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_own_stale_temporaries(target)
    temporary_dir = Path(tempfile.mkdtemp(prefix=temporary_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        yield temporary_dir
        os.chmod(temporary_dir, 0o777 & ~umask())  # mkdtemp made it 0o700
        check_output_dir(given, contents, key=key, reads=reads)  # nothing foreign arrived during the work
        old_dir = target.with_name(f".{target.name}.old")
        if target.exists():
            _remove_previous(old_dir)
            os.replace(target, old_dir)
        os.replace(temporary_dir, target)
        _remove_previous(old_dir)  # also what a kill between the two renames of an earlier run left
    except BaseException as error:
        shutil.rmtree(temporary_dir, ignore_errors=True)
        if isinstance(error, OSError):
            error.add_note(f"while writing {given} (not replaced)")
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

"""Work locks: one run of a stage at a time in a workspace (``flock`` on ``checkpoints/.locks/<label>.lock``).

Two direct runs of one stage in one workspace would interleave their checkpoints, dvclive rows and work
folders. ``stage_lock`` holds a lock without waiting; a held lock is :class:`StageBusyError`, one line naming
the run that holds it. The kernel releases an ``flock`` when its process ends, SIGKILL included, so a lock is
never left stale. ``dvc repro`` runs stages one at a time and refuses a second ``dvc repro`` itself.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from weakclip_core.errors import InputError

LOCK_DIR = Path("checkpoints") / ".locks"
"""Where the stages' work locks live: under the workspace's git-ignored ``checkpoints/`` (the working
directory is the workspace, as under ``dvc repro``). The files stay (holding the last exclusive holder's
pid); only a held ``flock`` means anything."""


class StageBusyError(InputError):
    """Another run of the same stage holds its work lock in this workspace."""


def shard_locks(label: str, index: int, count: int, merge: bool) -> list[tuple[str, bool]]:
    """The work locks of a sharded stage's run, as ``(name, exclusive)``: one shard of several
    (``--shard i/n``, n > 1, not ``--merge``) takes ``label`` shared and ``<label>.shard-i-of-n`` exclusive, so
    shards run together but the same shard twice does not; a merge or an unsharded run takes ``label``
    exclusive, so it waits for no shard and no shard starts under it."""
    if count > 1 and not merge:
        return [(label, False), (f"{label}.shard-{index}-of-{count}", True)]
    return [(label, True)]


def _lock_holder(path: Path) -> str:
    """``pid N`` from a lock file (its last exclusive holder wrote it), or ``''``."""
    try:
        text = path.read_text().strip()
    except OSError:
        return ""
    return f"pid {text}" if text.isdigit() else ""


def _busy_shards(lock_dir: Path, label: str) -> list[str]:
    """The shard locks of ``label`` that some process holds (probed without waiting), as ``shard i/n (pid N)``."""
    busy = []
    for path in sorted(lock_dir.glob(f"{label}.shard-*.lock")):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            shard = path.name[len(label) + len(".shard-"):-len(".lock")].replace("-of-", "/")
            holder = _lock_holder(path)
            busy.append(f"shard {shard}" + (f" ({holder})" if holder else ""))
        finally:
            os.close(descriptor)
    return busy


@contextmanager
def stage_lock(locks: Sequence[tuple[str, bool]], lock_dir: Path = LOCK_DIR) -> Iterator[None]:
    """Hold ``locks`` (see :func:`stage_locks`) without waiting; a lock another process holds raises
    :class:`StageBusyError` naming the run that holds it. Released when the block ends or the process dies."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    descriptors: list[int] = []
    try:
        for name, exclusive in locks:
            path = lock_dir / f"{name}.lock"
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children
            descriptors.append(descriptor)
            try:
                fcntl.flock(descriptor, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                base, _, shard = name.partition(".shard-")
                shards = [] if shard else _busy_shards(lock_dir, base)
                holder = ", ".join(shards) if shards else _lock_holder(path)
                what = f"another run of {base}" + (f" --shard {shard.replace('-of-', '/')}" if shard else "")
                raise StageBusyError(
                    f"{what} is in progress in this workspace{f' ({holder})' if holder else ''}; wait for it to "
                    f"finish or stop it (the lock is {path}; it is released when that process ends)") from None
            if exclusive:
                os.ftruncate(descriptor, 0)
                os.pwrite(descriptor, str(os.getpid()).encode(), 0)
        yield
    finally:
        for descriptor in reversed(descriptors):
            os.close(descriptor)

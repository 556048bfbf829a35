"""Worker-process hygiene for the process pools (dense CRF, pseudo-mask refinement).

A stage killed with SIGKILL cannot shut its pool down, and spawned workers
whose parent is gone can linger and burn CPU. ``die_with_parent`` is passed as
the pool ``initializer``: on Linux it asks the kernel to send SIGTERM to the
worker when the process that started it dies (``prctl(PR_SET_PDEATHSIG)``).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Pool initializer: end this worker when its parent process dies (Linux; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    parent_pid = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)

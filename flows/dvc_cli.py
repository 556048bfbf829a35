"""Run DVC and git commands as subprocesses, streaming their output into a logger.

The flows never import stage code: a stage runs only as ``dvc repro --single-item
<stage>``, so DVC alone decides whether it is stale and writes ``dvc.lock``. The
venv that runs the flow is put first on ``PATH`` so a stage's ``python -m
pipeline.<stage>`` and DVC itself come from the same environment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import psutil


URL_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*):[^/\s@]*@")
"""The ``:password@`` of a URL's user part (``https://alice:token@host/…``)."""


def mask_url_passwords(text: str) -> str:
    """``text`` with every URL's password masked (``https://alice:***@host/…``): what a command prints and is
    run with goes to the Prefect server's database and UI (logs, state messages), and DVC quotes remote URLs."""
    return URL_PASSWORD.sub(r"\g<scheme>:***@", text)


class CommandFailed(RuntimeError):
    """A command exited non-zero; the message names the command, the folder and the output's tail (URL passwords
    masked)."""

    def __init__(self, command: list[str], cwd: Path, returncode: int, output_tail: list[str]) -> None:
        self.command = command
        self.returncode = returncode
        tail = "\n".join(output_tail)
        super().__init__(mask_url_passwords(f"`{' '.join(command)}` in {cwd} exited with {returncode}; last "
                                            f"output:\n{tail}"))


@dataclass(frozen=True)
class CommandOutput:
    """Every line a finished command printed (stdout and stderr interleaved)."""

    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def tool_environment() -> dict[str, str]:
    """This process's environment with the venv's ``bin`` first and DVC's analytics off."""
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env["DVC_NO_ANALYTICS"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


ABANDON_GRACE_S = 30.0
"""How long an abandoned command and the processes under it have after SIGTERM (a stage's own clean shutdown)
before SIGKILL."""


def run_command(command: list[str], cwd: Path, logger: logging.Logger | logging.LoggerAdapter,
                abandon: threading.Event | None = None) -> CommandOutput:
    """Run ``command`` in ``cwd``, log each output line as it comes, raise ``CommandFailed`` on non-zero exit.

    ``abandon``: when it is set while the command runs, the command and every process under it (``dvc repro``
    and the stage it started) get SIGTERM, then SIGKILL after ``ABANDON_GRACE_S``, and ``CommandFailed`` says so. A
    worker sets it when the chain has given its stage run up (``flows.chain.stage``), so the stage does not run
    on beside the retry the chain sent elsewhere.
    """
    logger.info("$ %s  (in %s)", mask_url_passwords(" ".join(command)), cwd)
    lines: list[str] = []
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(
        command,
        cwd=cwd,
        env=tool_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as process:
        assert process.stdout is not None
        finished = threading.Event()
        if abandon is not None:
            threading.Thread(target=_stop_when_abandoned, args=(process, abandon, finished), daemon=True).start()
        try:
            for raw_line in process.stdout:
                line = raw_line.rstrip("\n")
                lines.append(line)
                tail.append(line)
                logger.info("%s", mask_url_passwords(line))
            returncode = process.wait()
        finally:
            finished.set()
    if abandon is not None and abandon.is_set():
        raise CommandFailed(command, cwd, returncode, [*tail, "(stopped: the run was abandoned)"])
    if returncode != 0:
        raise CommandFailed(command, cwd, returncode, list(tail))
    return CommandOutput(lines=tuple(lines))


def _stop_when_abandoned(process: subprocess.Popen, abandon: threading.Event, finished: threading.Event) -> None:
    """SIGTERM to ``process`` and every process under it once ``abandon`` is set (unless it has ``finished``),
    SIGKILL to those still there after the grace period. The tree is walked rather than a process group
    signalled: the command stays in the flow run's group, so a cancelled flow run still takes it along."""
    while not finished.is_set():
        if abandon.wait(0.5):
            break
    if finished.is_set():
        return
    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.terminate()
    _, alive = psutil.wait_procs(tree, timeout=ABANDON_GRACE_S)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()


def dvc_command(*args: str) -> list[str]:
    """``dvc --wait-for-lock <args>`` through this interpreter, so the DVC that runs is the one installed beside
    Prefect.

    ``--wait-for-lock``: DVC gives up on its repository lock after 3 s (6 tries) by default, and ``dvc repro``
    drops that lock while the stage's command runs and takes it again to record the result. Two branches of the
    chain in one clone (``max_parallel``), or a pull beside a stage, can hold it longer than 3 s (hashing a
    large output), and the stage that had just finished hours of work would fail before writing ``dvc.lock``
    and run again on retry. The lock is a file lock its holder's death releases, so waiting cannot outlive a
    crashed holder; a run the chain gives up is stopped while it waits like any other command."""
    return [sys.executable, "-m", "dvc", "--wait-for-lock", *args]


def capture_command(command: list[str], cwd: Path) -> str:
    """Run ``command`` and return its stdout alone (for machine-read output such as ``--json``)."""
    completed = subprocess.run(command, cwd=cwd, env=tool_environment(), capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise CommandFailed(command, cwd, completed.returncode, completed.stderr.splitlines()[-40:])
    return completed.stdout

"""Run DVC and git commands as subprocesses, streaming their output into a logger.

The flows never import stage code: a stage runs only as ``dvc repro --single-item
<stage>``, so DVC alone decides whether it is stale and writes ``dvc.lock``. The
venv that runs the flow is put first on ``PATH`` so a stage's ``python -m
pipeline.<stage>`` and DVC itself come from the same environment.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path


class CommandFailed(RuntimeError):
    """A command exited non-zero; the message names the command, the folder and the output's tail."""

    def __init__(self, command: list[str], cwd: Path, returncode: int, output_tail: list[str]) -> None:
        self.command = command
        self.returncode = returncode
        tail = "\n".join(output_tail)
        super().__init__(f"`{' '.join(command)}` in {cwd} exited with {returncode}; last output:\n{tail}")


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


def run_command(command: list[str], cwd: Path, logger: logging.Logger | logging.LoggerAdapter) -> CommandOutput:
    """Run ``command`` in ``cwd``, log each output line as it comes, raise ``CommandFailed`` on non-zero exit."""
    logger.info("$ %s  (in %s)", " ".join(command), cwd)
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
        for raw_line in process.stdout:
            line = raw_line.rstrip("\n")
            lines.append(line)
            tail.append(line)
            logger.info("%s", line)
        returncode = process.wait()
    if returncode != 0:
        raise CommandFailed(command, cwd, returncode, list(tail))
    return CommandOutput(lines=tuple(lines))


def dvc_command(*args: str) -> list[str]:
    """``dvc <args>`` through this interpreter, so the DVC that runs is the one installed beside Prefect."""
    return [sys.executable, "-m", "dvc", *args]


def capture_command(command: list[str], cwd: Path) -> str:
    """Run ``command`` and return its stdout alone (for machine-read output such as ``--json``)."""
    completed = subprocess.run(command, cwd=cwd, env=tool_environment(), capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise CommandFailed(command, cwd, completed.returncode, completed.stderr.splitlines()[-40:])
    return completed.stdout

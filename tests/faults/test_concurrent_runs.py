"""Two direct runs of a stage in one workspace (issue #22, finding 5).

The first run is a real stage process held still at an event (an optimizer step, an atomic rename about to
happen) by the *pause harness* below; while it waits, a second run of the same stage starts in the same
folder. It must be refused in one line naming the first run's pid (exit 1, before it reads or writes
anything); the first run, released, must finish with exactly the outputs an undisturbed run writes.
``pseudo_masks --shard i/n`` runs of different shards may run at once (its docstring), the same shard twice
may not, and ``--merge`` waits for none of them.

Run as a script, this module is the pause harness::

    python tests/faults/test_concurrent_runs.py --pause-at step --after 1 --ready R --release G -- \\
        pipeline.cam_train --params params.yaml

At the ``after``-th event it writes its pid into ``R``, then sleeps until ``G`` exists (at most
``PAUSE_LIMIT_S``). Signals reach it while it sleeps, as they would reach a working stage.
"""

from __future__ import annotations

import argparse
import os
import runpy
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_chain import REPO_ROOT, is_temporary, stage_env  # noqa: E402

HARNESS = Path(__file__).resolve()
PAUSE_LIMIT_S = 300.0
READY_TIMEOUT_S = 300.0


# --------------------------------------------------------------------------- the pause harness

def install_pause(event: str, after: int, ready: Path, release: Path) -> None:
    """Hold this process at the ``after``-th ``event``: ``step`` (after an optimizer step), ``replace`` (an
    atomic writer about to rename its complete temporary) or ``fsync`` (e.g. a manifest line made durable)."""
    seen = [0]

    def tick() -> None:
        seen[0] += 1
        if seen[0] != after:
            return
        ready.write_text(str(os.getpid()))
        deadline = time.monotonic() + PAUSE_LIMIT_S
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    if event == "step":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda optimizer, args, kwargs: tick())
    elif event == "replace":
        original_replace = os.replace

        def tick_then_replace(source: Any, destination: Any, *args: Any, **kwargs: Any) -> None:
            if is_temporary(Path(os.fspath(source))):
                tick()
            original_replace(source, destination, *args, **kwargs)

        os.replace = tick_then_replace  # type: ignore[assignment]
    elif event == "fsync":
        original_fsync = os.fsync

        def fsync_then_tick(descriptor: int) -> None:
            original_fsync(descriptor)
            tick()

        os.fsync = fsync_then_tick  # type: ignore[assignment]
    else:
        raise ValueError(f"--pause-at: expected step, replace or fsync, got {event!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a stage module, holding it still at the n-th event.")
    parser.add_argument("--pause-at", required=True, choices=("step", "replace", "fsync"))
    parser.add_argument("--after", type=int, required=True)
    parser.add_argument("--ready", type=Path, required=True)
    parser.add_argument("--release", type=Path, required=True)
    parser.add_argument("module")
    parser.add_argument("stage_args", nargs=argparse.REMAINDER)
    arguments = parser.parse_args(argv)
    install_pause(arguments.pause_at, arguments.after, arguments.ready, arguments.release)
    sys.argv = [arguments.module, *[a for a in arguments.stage_args if a != "--"]]
    sys.path.insert(0, str(REPO_ROOT))
    runpy.run_module(arguments.module, run_name="__main__", alter_sys=True)


# --------------------------------------------------------------------------- helpers for the tests

class PausedRun:
    """A stage process started under the pause harness in ``project``; its output goes to files in ``logs``."""

    def __init__(self, project: Path, logs: Path, name: str, event: str, after: int, module: str, *args: str,
                 new_session: bool = False) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.ready, self.release = logs / f"{name}.ready", logs / f"{name}.release"
        self.stdout_path, self.stderr_path = logs / f"{name}.out", logs / f"{name}.err"
        command = [sys.executable, str(HARNESS), "--pause-at", event, "--after", str(after),
                   "--ready", str(self.ready), "--release", str(self.release), "--", module,
                   "--params", "params.yaml", *args]
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(command, cwd=project, env=stage_env(), stdout=stdout, stderr=stderr,
                                            start_new_session=new_session)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_until_paused(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"the first run never reached its pause (exit {self.process.poll()}):\n"
                                     f"{self.stderr_path.read_text()[-3000:]}")
            time.sleep(0.05)

    def resume_and_wait(self) -> int:
        self.release.write_text("go")
        return self.process.wait(timeout=READY_TIMEOUT_S)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()


def run_stage_process(project: Path, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, "--params", "params.yaml", *args], cwd=project,
                          env=stage_env(), capture_output=True, text=True, timeout=READY_TIMEOUT_S)


def error_lines(stderr: str) -> list[str]:
    """stderr minus progress bars and blank lines."""
    return [line for line in stderr.splitlines() if line.strip() and "%|" not in line]


def files_under(project: Path, *relatives: str) -> dict[str, bytes]:
    found = {}
    for relative in relatives:
        root = project / relative
        for path in sorted([root] if root.is_file() else root.rglob("*")):
            if path.is_file():
                found[str(path.relative_to(project))] = path.read_bytes()
    return found


def refused_line(stage: str, holder: str, lock: str) -> str:
    return (f"{stage}: error: another run of {holder} is in progress in this workspace; wait for it to finish or "
            f"stop it (the lock is {lock}; it is released when that process ends)")


@pytest.fixture
def project(model_project: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "project"
    shutil.copytree(model_project, copy)
    return copy


# --------------------------------------------------------------------------- the tests

def test_second_cam_train_is_refused_and_the_first_finishes_undisturbed(project: Path, model_project: Path,
                                                                        tmp_path: Path) -> None:
    """Two ``cam_train`` runs used to interleave: the dvclive history got rows twice (148 of 100) and the
    second died on a torn JSON file. Now the second is refused; the first writes what an undisturbed run does."""
    outputs = ("artifacts/mctformer", "dvclive/cam_train")
    for relative in outputs:
        shutil.rmtree(project / relative)
    first = PausedRun(project, tmp_path / "logs", "first", "step", 1, "pipeline.cam_train")
    first.wait_until_paused()
    second = run_stage_process(project, "pipeline.cam_train")
    assert second.returncode == 1, second.stderr
    assert "Traceback" not in second.stderr
    assert error_lines(second.stderr) == [refused_line(
        "cam_train", "cam_train", "checkpoints/.locks/cam_train.lock").replace(
        "in this workspace;", f"in this workspace (pid {first.pid});")]
    assert first.resume_and_wait() == 0, first.stderr
    assert files_under(project, *outputs) == files_under(model_project, *outputs)  # rows once each, same model
    assert [path for path in project.rglob("*") if is_temporary(path)] == []
    assert run_stage_process(project, "pipeline.cam_train").returncode == 0  # the lock went with the first run


def test_second_pseudo_masks_is_refused_and_keeps_the_first_runs_work_folder(project: Path, tmp_path: Path) -> None:
    """The second run used to finish and delete the shared work folder under the first, which then died with
    ``12 of 12 images are not done``. Now the second is refused and the first finishes."""
    first = PausedRun(project, tmp_path / "logs", "first", "replace", 3, "pipeline.pseudo_masks")
    first.wait_until_paused()
    work_before = files_under(project, "checkpoints/pseudo_masks")
    second = run_stage_process(project, "pipeline.pseudo_masks")
    assert second.returncode == 1, second.stderr
    assert error_lines(second.stderr) == [refused_line(
        "pseudo_masks", "pseudo_masks", "checkpoints/.locks/pseudo_masks.lock").replace(
        "in this workspace;", f"in this workspace (pid {first.pid});")]
    assert files_under(project, "checkpoints/pseudo_masks") == work_before  # the first run's work untouched
    assert first.resume_and_wait() == 0, first.stderr
    assert len(list((project / "pseudo_masks").glob("*.png"))) == 8
    assert (project / "metrics/pseudo.json").is_file()
    assert [path for path in project.rglob("*") if is_temporary(path)] == []


def test_shards_run_at_once_but_not_twice_and_merge_waits_for_them(project: Path, tmp_path: Path) -> None:
    first = PausedRun(project, tmp_path / "logs", "shard0", "replace", 1, "pipeline.pseudo_masks", "--shard", "0/2")
    first.wait_until_paused()
    other_shard = run_stage_process(project, "pipeline.pseudo_masks", "--shard", "1/2")
    assert other_shard.returncode == 0, other_shard.stderr  # shards may run at once
    same_shard = run_stage_process(project, "pipeline.pseudo_masks", "--shard", "0/2")
    assert same_shard.returncode == 1, same_shard.stderr
    assert error_lines(same_shard.stderr) == [refused_line(
        "pseudo_masks", "pseudo_masks --shard 0/2", "checkpoints/.locks/pseudo_masks.shard-0-of-2.lock").replace(
        "in this workspace;", f"in this workspace (pid {first.pid});")]
    for arguments in (("--merge",), ()):
        merge = run_stage_process(project, "pipeline.pseudo_masks", *arguments)
        assert merge.returncode == 1, merge.stderr
        assert error_lines(merge.stderr) == [refused_line(
            "pseudo_masks", "pseudo_masks", "checkpoints/.locks/pseudo_masks.lock").replace(
            "in this workspace;", f"in this workspace (shard 0/2 (pid {first.pid}));")]
    assert not (project / "metrics/pseudo.json").exists()
    assert first.resume_and_wait() == 0, first.stderr
    merged = run_stage_process(project, "pipeline.pseudo_masks", "--merge")
    assert merged.returncode == 0, merged.stderr
    assert len(list((project / "pseudo_masks").glob("*.png"))) == 8


if __name__ == "__main__":
    main()

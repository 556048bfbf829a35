"""SIGINT and SIGTERM reaching a stage (issue #22, the signal half of finding 7).

The stage is a real process held still by the pause harness (``test_concurrent_runs.py``) at a moment when
a temporary file exists: an atomic writer about to rename its complete temporary, or (``pseudo_masks`` with
a CRF process pool) a manifest line just made durable. Then the signal arrives: SIGINT to the whole process
group, as Ctrl-C in a terminal sends it, or SIGTERM to the stage's process, as ``kill``, a scheduler or a
timeout sends it. Every stage must print one line, ``<stage>: interrupted (SIGINT)``, no traceback, and exit
130 for SIGINT and 143 for SIGTERM (128 + the signal number); the temporaries are deleted, the pool's
workers are gone, nothing already written is lost, and the next run works (the work lock went with the
process).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml

from test_bad_inputs import snapshot
from test_concurrent_runs import PausedRun, error_lines, project, run_stage_process  # noqa: F401
from tiny_chain import is_temporary, params_text


def interrupt(run: PausedRun, signum: int) -> int:
    """Send ``signum`` (SIGINT to the process group, like Ctrl-C; SIGTERM to the stage process) and wait."""
    if signum == signal.SIGINT:
        os.killpg(run.pid, signum)
    else:
        os.kill(run.pid, signum)
    return run.process.wait(timeout=120)


def assert_group_is_gone(group: int) -> None:
    """No process of the stage's process group (its pool workers) outlives it."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of group {group} are still running after the stage exited")


def check_interrupted(project: Path, run: PausedRun, signum: int, stage: str, before: dict[str, bytes]) -> None:
    code = interrupt(run, signum)
    stderr = run.stderr
    assert "Traceback" not in stderr, stderr
    assert error_lines(stderr) == [f"{stage}: interrupted ({signal.Signals(signum).name})"], stderr
    assert code == 128 + signum, stderr
    assert [str(path) for path in project.rglob("*") if is_temporary(path)] == []
    after = snapshot(project)
    assert {key: value for key, value in after.items() if key in before} == before  # nothing written is lost
    assert_group_is_gone(run.pid)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_cam_train_is_one_line_and_leaves_no_temporary(project: Path, tmp_path: Path,
                                                                   signum: int) -> None:
    """Held inside its first checkpoint write (the temporary complete, not yet renamed)."""
    for relative in ("artifacts/mctformer", "dvclive/cam_train"):
        shutil.rmtree(project / relative)
    before = snapshot(project)
    run = PausedRun(project, tmp_path / "logs", "run", "replace", 1, "pipeline.cam_train", new_session=True)
    run.wait_until_paused()
    assert [path for path in (project / "checkpoints").rglob("*") if is_temporary(path)] != []  # one to clean
    check_interrupted(project, run, signum, "cam_train", before)
    if signum == signal.SIGTERM:
        rerun = run_stage_process(project, "pipeline.cam_train")
        assert rerun.returncode == 0, rerun.stderr  # the lock went with the interrupted process


@pytest.mark.parametrize("signum, workers, event", [(signal.SIGINT, 1, "fsync"), (signal.SIGTERM, 0, "replace"),
                                                    (signal.SIGTERM, 1, "fsync")],
                         ids=["SIGINT-pool", "SIGTERM-in-a-write", "SIGTERM-pool"])
def test_interrupted_pseudo_masks_is_one_line_and_shuts_its_pool(project: Path, tmp_path: Path, signum: int,
                                                                  workers: int, event: str) -> None:
    """``pseudo_masks`` exited 1 on SIGINT, cam_train 130: now both 130 (143 for SIGTERM), with or without
    the CRF process pool (its workers ignore Ctrl-C and are shut down by the stage)."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pseudo"]["workers"] = workers
    (project / "params.yaml").write_text(params_text(params))
    before = snapshot(project)
    run = PausedRun(project, tmp_path / "logs", "run", event, 2, "pipeline.pseudo_masks", new_session=True)
    run.wait_until_paused()
    check_interrupted(project, run, signum, "pseudo_masks", before)
    assert not (project / "metrics/pseudo.json").exists()
    rerun = run_stage_process(project, "pipeline.pseudo_masks")
    assert rerun.returncode == 0, rerun.stderr  # resumes from the work folder the interrupted run kept

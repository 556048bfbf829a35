"""Issue #16, faults of a machine mid-stage (split from tests/test_multi_machine.py, whose demo project, server
and workers these use, so that the two halves, each minutes long, run on two pytest-xdist workers at once): a GPU
machine killed mid-stage, and one frozen past ``worker_lost_after_s`` that wakes after its run was given up. In
both the chain retries the stage and the coordinator's lock equals an uninterrupted one-folder ``dvc repro``'s."""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from flows.demo import demo_stages, write_demo_project
from flows.local_server import LocalServer
from test_multi_machine import (DVC, deployed_server, dvc_status_clean, git_identity, lock_outs, machines, run,
                                workers)

__all__ = ["git_identity"]  # the autouse fixture that gives every git command here the tests' identity


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with deployed_server(tmp_path_factory.mktemp("mm_faults_prefect_home")) as running:
        yield running


def slow_once_stages(marker: Path, first_done: Path | None = None) -> dict[str, dict]:
    """The demo with a cam_train that, on its first attempt only, announces itself and sleeps 60 s (then writes
    ``first_done``, when given: the first attempt ran to its end)."""
    stages = demo_stages()
    done = f"; first and pathlib.Path('{first_done}').write_text('ran on')" if first_done else ""
    code = (
        f"import os, pathlib, time; m = pathlib.Path('{marker}'); first = not m.exists(); m.write_text('started'); "
        f"time.sleep(60 if first else 0){done}"
    )
    stages["cam_train"] = dict(stages["cam_train"], cmd=f'python -c "{code}" && ' + stages["cam_train"]["cmd"])
    return stages


def chain_in_background(clones: dict[str, Path], marker: Path, result: dict[str, object]) -> threading.Thread:
    """The chain over the pools (cam_train retried twice, a worker silent for 20 s taken for lost) in a thread,
    returned once cam_train has started (``marker``) and run 2 s; its final state goes to ``result["state"]``."""
    from flows.chain import chain

    def coordinate() -> None:
        result["state"] = chain(
            repo_dir=str(clones["coordinator"]), dispatch="pools", remote="shared", retries=2, retry_delay_s=0.5,
            start_timeout_s=120, worker_lost_after_s=20, return_state=True,
        )

    context = contextvars.copy_context()  # the Prefect settings (the API URL) live in context variables
    coordinator_thread = threading.Thread(target=context.run, args=(coordinate,), daemon=True)
    coordinator_thread.start()
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert time.monotonic() < deadline and coordinator_thread.is_alive(), "cam_train never started"
        time.sleep(0.5)
    time.sleep(2)
    return coordinator_thread


def stage_processes(worker: subprocess.Popen) -> list[int]:
    """The worker, the stage's flow run process (the process worker starts it in a session of its own) and the
    stage's command: every process of a machine's stage."""
    pids = [worker.pid] + [child.pid for child in psutil.Process(worker.pid).children(recursive=True)]
    assert len(pids) >= 3, "the stage's processes were not found under the worker"
    return pids


@pytest.mark.slow
def test_a_worker_killed_mid_stage_is_retried_and_the_lock_is_an_uninterrupted_runs(server: LocalServer, tmp_path: Path) -> None:
    marker = tmp_path / "cam_train.started"
    origin = write_demo_project(tmp_path / "origin", stages=slow_once_stages(marker), remote_dir=tmp_path / "nfs-remote")
    clones = machines(tmp_path, origin)
    result: dict[str, object] = {}

    with workers(server, clones["cpu_worker"], None):
        with workers(server, None, clones["gpu_worker"]) as gpu:
            coordinator_thread = chain_in_background(clones, marker, result)
            # The GPU machine dies mid-stage: all of its stage's processes at once.
            for pid in stage_processes(gpu["gpu"]):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            gpu["gpu"].wait(timeout=30)
        with workers(server, None, clones["gpu_worker"]):  # it comes back
            coordinator_thread.join(timeout=400)
    assert not coordinator_thread.is_alive()
    state = result["state"]
    assert state.is_completed(), state.message  # type: ignore[attr-defined]
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        chain_run = client.read_flow_run(state.state_details.flow_run_id)  # type: ignore[attr-defined]
        stage_runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[chain_run.id]))
        )
    cam_train_runs = sorted((run_ for run_ in stage_runs if run_.parameters["stage_name"] == "cam_train"), key=lambda r: r.created)
    assert [run_.state.type.value for run_ in cam_train_runs] == ["CRASHED", "COMPLETED"]
    assert "worker lost" in cam_train_runs[0].state.message
    run([*DVC, "repro"], clones["reference"])  # uninterrupted (the marker exists: no sleep)
    assert lock_outs(clones["coordinator"]) == lock_outs(clones["reference"])
    assert dvc_status_clean(clones["coordinator"])


@pytest.mark.slow
def test_a_frozen_worker_given_up_for_lost_stops_its_stage_when_it_wakes(server: LocalServer, tmp_path: Path) -> None:
    """A GPU machine cut off mid-stage (its worker, the stage's flow run and command all frozen: SIGSTOP) for
    longer than ``worker_lost_after_s``: the chain marks the run Crashed and sends a retry. When the machine
    comes back (SIGCONT), its heartbeat reads that its run was given up and stops the stage (the first attempt
    never reaches its end), and the retry runs in the clone it frees; the lock is an uninterrupted run's.
    Without the check the first attempt ran on to its end beside the retry (double the GPU time)."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterStartTime

    marker, first_done = tmp_path / "cam_train.started", tmp_path / "cam_train.first_attempt_done"
    origin = write_demo_project(tmp_path / "origin", stages=slow_once_stages(marker, first_done),
                                remote_dir=tmp_path / "nfs-remote")
    clones = machines(tmp_path, origin)
    result: dict[str, object] = {}
    test_start = datetime.datetime.now(datetime.timezone.utc)

    def cam_train_runs(client) -> list:
        """This test's cam_train runs (the module's server holds the other tests' runs too)."""
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(after_=test_start)))
        return sorted((run_ for run_ in runs if run_.parameters.get("stage_name") == "cam_train"),
                      key=lambda r: r.created)

    with workers(server, clones["cpu_worker"], clones["gpu_worker"]) as started:
        coordinator_thread = chain_in_background(clones, marker, result)
        frozen = stage_processes(started["gpu"])
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            with get_client(sync_client=True) as client:
                deadline = time.monotonic() + 120
                while not (cam_train_runs(client) and cam_train_runs(client)[0].state.is_crashed()):
                    assert time.monotonic() < deadline, "the chain never gave the frozen run up"
                    time.sleep(1)
        finally:
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        coordinator_thread.join(timeout=400)
    assert not coordinator_thread.is_alive()
    state = result["state"]
    assert state.is_completed(), state.message  # type: ignore[attr-defined]
    assert not first_done.exists(), "the abandoned first attempt ran on to its end beside the retry"
    with get_client(sync_client=True) as client:
        runs = cam_train_runs(client)
    # The first run, marked Crashed by the chain, ends Failed once its worker has stopped it, saying why.
    assert [run_.state.type.value for run_ in runs] == ["FAILED", "COMPLETED"]
    assert "stopped because the chain gave this run up" in runs[0].state.message
    run([*DVC, "repro"], clones["reference"])  # uninterrupted (the marker exists: no sleep)
    assert lock_outs(clones["coordinator"]) == lock_outs(clones["reference"])
    assert dvc_status_clean(clones["coordinator"])

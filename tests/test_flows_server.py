"""The chain on a real local Prefect server: work pools, process workers, prefect.yaml, the UI in Chromium.

One server (127.0.0.1, free port, Prefect home in tmp) for the module; pools,
queues and deployments come from the project's deploy step (``python -m
flows.deploy --gpus 1``, from the repository's ``prefect.yaml``), and real
``prefect worker`` processes run them: the CPU pool's worker and one GPU-pool
worker on queue ``gpu-0``, each in its own clone of the demo project; the chain
deployment runs in a third clone (the coordinator). tests/test_multi_machine.py
checks the many-machine guarantees in depth.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from flows.demo import demo_stages, write_demo_project
from flows.local_server import (
    LocalServer,
    drain_prefect_clients,
    local_prefect_server,
    prefect_environment,
    process_worker,
)
from flows.resources import CPU_POOL, GPU_POOL

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
DVC = [sys.executable, "-m", "dvc"]


def prefect_python(server: LocalServer, *args: str) -> str:
    completed = subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=prefect_environment(server.home, server.api_url),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, f"python {' '.join(args)} failed:\n{completed.stdout}\n{completed.stderr}"
    return completed.stdout


def lock_hashes(repo: Path) -> dict[str, dict[str, str]]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {stage: {out["path"]: out["md5"] for out in entry.get("outs", [])} for stage, entry in lock["stages"].items()}


@dataclass(frozen=True)
class PoolRun:
    flow_run_id: str
    flow_run_name: str
    project: Path  # the coordinator's clone
    gpu_clone: Path  # the GPU worker's clone


@pytest.fixture(scope="module")
def clones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo project (DVC remote: a folder) and three clones: the coordinator's and one per worker."""
    root = tmp_path_factory.mktemp("pools")
    origin = write_demo_project(root / "origin", remote_dir=root / "dvc-remote")
    found = {}
    for name in ("coordinator", "cpu_worker", "gpu_worker"):
        subprocess.run(["git", "clone", "--quiet", str(origin), str(root / name)], check=True, capture_output=True)
        found[name] = root / name
    return found


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, clones: dict[str, Path]) -> Iterator[LocalServer]:
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    home = tmp_path_factory.mktemp("prefect_server_home")
    with local_prefect_server(home) as running:
        # The project's deploy step: pools, queues (gpu-0 with concurrency limit 1), prefect.yaml's deployments.
        prefect_python(running, "-m", "flows.deploy", "--gpus", "1")

        def env(clone: Path) -> dict[str, str]:
            return {"WEAKCLIP_REPO": str(REPO_ROOT), "WEAKCLIP_PROJECT": str(clone)}

        with (
            # No --work-queue: this worker runs the chain (queue coordinator, in the coordinator's clone given
            # as repo_dir) and the CPU stages (queue cpu, in its own clone).
            process_worker(running, CPU_POOL, extra_env=env(clones["cpu_worker"])),
            process_worker(running, GPU_POOL, work_queue="gpu-0", extra_env=env(clones["gpu_worker"])),
            temporary_settings({PREFECT_API_URL: running.api_url, PREFECT_SERVER_ANALYTICS_ENABLED: False}),
        ):
            yield running
            drain_prefect_clients()


@pytest.fixture(scope="module")
def pool_run(server: LocalServer, clones: dict[str, Path]) -> PoolRun:
    from prefect.deployments import run_deployment

    project = clones["coordinator"]
    flow_run = run_deployment(
        "chain/chain",
        parameters={"repo_dir": str(project), "dispatch": "pools", "gpu_count": 1, "start_timeout_s": 120},
        timeout=400,
        poll_interval=1,
        as_subflow=False,
    )
    assert flow_run.state is not None and flow_run.state.is_completed(), (
        f"chain ended {flow_run.state}; worker logs in {server.home}"
    )
    return PoolRun(flow_run_id=str(flow_run.id), flow_run_name=flow_run.name, project=project, gpu_clone=clones["gpu_worker"])


@pytest.mark.slow
def test_pool_run_leaves_the_same_lock_as_dvc_repro(pool_run: PoolRun, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    subprocess.run(["git", "clone", "--quiet", str(pool_run.project), str(reference)], check=True, env=env)
    subprocess.run([*DVC, "repro"], cwd=reference, check=True, env=env, capture_output=True)
    assert lock_hashes(pool_run.project) == lock_hashes(reference)
    assert set(lock_hashes(pool_run.project)) == set(demo_stages())
    # cam_train is a GPU stage: it ran on the GPU pool's queue gpu-0, pinned by the deployment's job variables.
    assert (pool_run.gpu_clone / "env" / "cam_train.txt").read_text() == "0"
    assert not (pool_run.project / "env").exists()  # the coordinator's clone ran no stage


@pytest.mark.slow
def test_stages_ran_as_deployments_on_their_pools_with_logs(pool_run: PoolRun, server: LocalServer) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        parent_task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id={"any_": [pool_run.flow_run_id]})
        )
        stage_runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[pool_run.flow_run_id])
            )
        )
        pools_by_stage = {run.parameters["stage_name"]: run.work_pool_name for run in stage_runs}
        cam_train_run = next(run for run in stage_runs if run.parameters["stage_name"] == "cam_train")
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[cam_train_run.id])))
    # One task per stage, named "<stage> → <deployment>" (run_deployment adds its own placeholder task runs).
    stage_tasks = {run.name.split(" → ")[0]: run for run in parent_task_runs if " → " in run.name}
    assert set(stage_tasks) == set(demo_stages())
    assert stage_tasks["cam_train"].name == "cam_train → stage/stage-gpu-0"
    assert all(run.state.is_completed() for run in stage_tasks.values())
    assert pools_by_stage == {
        "prepare": CPU_POOL,
        "cam_train": GPU_POOL,
        "eval_a": CPU_POOL,
        "eval_b": CPU_POOL,
        "summary": CPU_POOL,
    }
    assert all(run.state.is_completed() for run in stage_runs)
    messages = [log.message for log in logs]
    assert "Running stage 'cam_train':" in messages  # dvc repro's own output, in the stage's flow run logs


def chromium_dom(url: str, profile: Path, expected: list[str], attempts: int = 3) -> str:
    """The text of ``url``'s DOM after the single-page app rendered (headless Chromium, loopback only).

    ``--virtual-time-budget`` runs the page's timers fast but the API answers in real time: on a
    loaded machine the first dump can come before the data. Load again (up to ``attempts`` times)
    until every ``expected`` string is on the page; the caller asserts on the last dump.
    """
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the UI check needs Debian's chromium "
            "(as root: apt-get update && apt-get install -y chromium; .ci/run does this)"
        )
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=20000",
        "--dump-dom",
        url,
    ]
    text = ""
    for _ in range(attempts):
        shutil.rmtree(profile, ignore_errors=True)
        completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert completed.returncode == 0, completed.stderr[-2000:]
        text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", completed.stdout))
        if all(needle in text for needle in expected):
            break
    return text


@pytest.mark.slow
def test_ui_shows_the_flow_run_and_its_metric_artifacts(pool_run: PoolRun, server: LocalServer, tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    run_expected = [pool_run.flow_run_name, "Completed", "Artifacts"]
    run_page = chromium_dom(f"{server.ui_url}/runs/flow-run/{pool_run.flow_run_id}", tmp_path / "profile-run", run_expected)
    assert all(needle in run_page for needle in run_expected), run_page[-1500:]
    assert "Can't connect to Server API" not in run_page

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["chain-miou", "eval-a-metrics"])))
    ids = {artifact.key: artifact.id for artifact in artifacts}
    assert set(ids) == {"chain-miou", "eval-a-metrics"}

    # The mIoU table as the UI renders it, against the metrics files read here independently.
    rows = []
    for stage_name, path, key in (("eval_a", "eval_a.json", "miou"), ("eval_b", "eval_b.json", "miou"), ("summary", "summary.json", "summary_miou")):
        value = json.loads((pool_run.project / "metrics" / path).read_text())[key]
        rows.append(f"{stage_name} metrics/{path}: {key} {value:.4f}")
    miou_page = chromium_dom(f"{server.ui_url}/artifacts/artifact/{ids['chain-miou']}", tmp_path / "profile-miou", rows)
    assert all(row in miou_page for row in rows), miou_page[-1500:]
    table_row = "metrics/eval_a.json per_class.cat 0.25"
    table_page = chromium_dom(f"{server.ui_url}/artifacts/artifact/{ids['eval-a-metrics']}", tmp_path / "profile-table", [table_row])
    assert table_row in table_page, table_page[-1500:]

"""Issue #16: stages on other machines' workers, one correct dvc.lock at the coordinator.

Every "machine" is its own git clone with its own DVC cache (DVC's cache is the clone's
``.dvc/cache``): the CPU worker's clone, the GPU worker's clone, the coordinator's clone,
and a fresh fourth clone that checks the result. They share only the Prefect server
(127.0.0.1, free port, home in tmp) and a DVC remote: a folder (a cluster's NFS) here, a
real OpenSSH server in tests/test_multi_machine_ssh.py. Workers are real ``prefect worker``
processes on the pools and queues that ``python -m flows.deploy`` created; the coordinator is
the ``chain`` flow called in this process.

Two projects. The demo (flows/demo.py: five stages whose commands take no time) runs here over
a folder remote and serves the faults: a second chain after a committed code change, a worker
killed mid-stage, one stage per GPU, no worker polling, auth. The tiny chain (the repository's
own dvc.yaml, code and tiny params: eleven stages, nine on the GPU pool) runs over the SSH
remote in tests/test_multi_machine_ssh.py, a module of its own so that the two halves, each
minutes long, can run on two pytest-xdist workers at once. The remote's kind and the stages are
independent of each other (the workers only ``dvc pull`` / ``dvc push`` through it), so the tiny
chain runs over one remote kind and the demo over the other: a second tiny chain over a folder
took about 170 s of the suite and checked nothing the two runs do not. References: a plain
``dvc repro`` of the same project in one folder, ``dvc status``, ``dvc pull`` in the fresh
clone, the metrics files on disk.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psutil
import pytest
import yaml

from flows.demo import demo_stages, write_demo_project
from flows.local_server import (
    LocalServer,
    drain_prefect_clients,
    local_prefect_server,
    process_worker,
)
from flows.resources import CPU_POOL, CPU_STAGE_QUEUE, GPU_POOL, gpu_queue

REPO_ROOT = Path(__file__).resolve().parent.parent
DVC = [sys.executable, "-m", "dvc"]
SSHD = Path("/usr/sbin/sshd")
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "multi machine test",
    "GIT_AUTHOR_EMAIL": "mm@example.invalid",
    "GIT_COMMITTER_NAME": "multi machine test",
    "GIT_COMMITTER_EMAIL": "mm@example.invalid",
}


def tool_env() -> dict[str, str]:
    return dict(
        os.environ,
        DVC_NO_ANALYTICS="1",
        PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        **GIT_IDENTITY,
    )


def run(command: list[str], cwd: Path, timeout: float = 300) -> str:
    completed = subprocess.run(command, cwd=cwd, env=tool_env(), capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, f"{command} in {cwd} failed:\n{completed.stdout}\n{completed.stderr}"
    return completed.stdout + completed.stderr


def lock_outs(repo: Path) -> dict[str, dict[str, str]]:
    """``{stage: {out path: md5}}`` of dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {stage: {out["path"]: out["md5"] for out in entry.get("outs", [])} for stage, entry in lock["stages"].items()}


def dvc_status_clean(repo: Path) -> bool:
    return json.loads(run([*DVC, "status", "--json"], repo).strip() or "{}") == {}


def clone(origin: Path, target: Path) -> Path:
    run(["git", "clone", "--quiet", str(origin), str(target)], origin.parent)
    return target


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def git_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in GIT_IDENTITY.items():
        monkeypatch.setenv(key, value)


@contextmanager
def deployed_server(home: Path) -> Iterator[LocalServer]:
    """One loopback server; pools, queues (GPU limit 1) and deployments from the project's deploy step."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    from flows.deploy import deploy

    with local_prefect_server(home) as running:
        with temporary_settings({PREFECT_API_URL: running.api_url, PREFECT_SERVER_ANALYTICS_ENABLED: False}):
            limits = deploy(gpus=1)
            assert limits[f"{GPU_POOL}/{gpu_queue(0)}"] == 1
            yield running
            drain_prefect_clients()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with deployed_server(tmp_path_factory.mktemp("mm_prefect_home")) as running:
        yield running


@contextmanager
def workers(server: LocalServer, cpu_clone: Path | None, gpu_clone: Path | None) -> Iterator[dict[str, subprocess.Popen]]:
    """A CPU-stage worker and a GPU-0 worker, each in its own clone (WEAKCLIP_PROJECT)."""
    started: dict[str, subprocess.Popen] = {}
    with ExitStack() as stack:
        for name, pool, queue, project in (("cpu", CPU_POOL, CPU_STAGE_QUEUE, cpu_clone), ("gpu", GPU_POOL, gpu_queue(0), gpu_clone)):
            if project is not None:
                env = {"WEAKCLIP_REPO": str(REPO_ROOT), "WEAKCLIP_PROJECT": str(project), **GIT_IDENTITY}
                started[name] = stack.enter_context(process_worker(server, pool, work_queue=queue, extra_env=env))
        yield started


def machines(tmp_path: Path, origin: Path) -> dict[str, Path]:
    return {name: clone(origin, tmp_path / name) for name in ("coordinator", "cpu_worker", "gpu_worker", "reference")}


def check_multi_machine_run(server: LocalServer, tmp_path: Path, origin: Path, remote: str, params_text: str) -> None:
    """The chain split over two workers' clones: the coordinator's lock equals a one-folder dvc repro's."""
    from prefect import get_client

    from flows.chain import chain

    clones = machines(tmp_path, origin)
    for name in ("coordinator", "reference"):
        (clones[name] / "params.yaml").write_text(params_text)  # an uncommitted params edit: it must travel
    run([*DVC, "repro"], clones["reference"])

    with workers(server, clones["cpu_worker"], clones["gpu_worker"]):
        report = chain(
            repo_dir=str(clones["coordinator"]), dispatch="pools", remote=remote, commit=True,
            retry_delay_s=0.5, start_timeout_s=120, worker_lost_after_s=120,
        )
    coordinator = clones["coordinator"]
    assert set(report.completed) == set(demo_stages())
    assert lock_outs(coordinator) == lock_outs(clones["reference"])
    assert dvc_status_clean(coordinator)
    assert (coordinator / "reports" / "summary.txt").read_text() == (clones["reference"] / "reports" / "summary.txt").read_text()
    # Split over both machines: cam_train ran only in the GPU worker's clone, the CPU stages only in the CPU one.
    assert (clones["gpu_worker"] / "env" / "cam_train.txt").read_text() == "0"
    assert not (clones["cpu_worker"] / "env").exists()
    assert (clones["cpu_worker"] / "metrics" / "summary.json").exists()
    assert not (clones["gpu_worker"] / "metrics" / "summary.json").exists()
    assert not (coordinator / "env").exists()  # the coordinator ran nothing itself
    # The lock is versioned: committed with the params it ran with; a fresh clone pulls everything.
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], coordinator).strip() == ""
    fresh = clone(coordinator, tmp_path / "fresh")
    assert not (fresh / "artifacts" / "model.txt").exists()
    run([*DVC, "pull"], fresh)
    assert dvc_status_clean(fresh)
    assert lock_outs(fresh) == lock_outs(clones["reference"])
    assert "Running stage" not in run([*DVC, "repro"], fresh)
    # Each stage's metrics artifact in the API equals its metrics file.
    stage_metrics = {
        "cam_train": "dvclive/cam_train/metrics.json",
        "eval_a": "metrics/eval_a.json",
        "eval_b": "metrics/eval_b.json",
        "summary": "metrics/summary.json",
    }
    with get_client(sync_client=True) as client:
        for stage_name, path in stage_metrics.items():
            assert metrics_artifact(client, stage_name, path) == metrics_file(coordinator / path), stage_name


def metrics_artifact(client: object, stage_name: str, path: str) -> dict[str, float]:
    """``{metric: value}`` of ``path`` in the stage's latest metrics artifact in the Prefect API."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.stage_run import artifact_key

    artifacts = client.read_artifacts(  # type: ignore[attr-defined]
        artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(stage_name, "metrics")])))
    latest = max(artifacts, key=lambda artifact: artifact.created)
    rows = json.loads(latest.data) if isinstance(latest.data, str) else latest.data
    return {row["metric"]: row["value"] for row in rows if row["file"] == path}


def metrics_file(path: Path) -> dict[str, float]:
    """The metrics file, flattened and rounded as the artifact shows it."""
    from flows.stage_run import flatten_metrics

    return {name: round(value, 6) for name, value in flatten_metrics(json.loads(path.read_text())).items()}


# --------------------------------------------------------------------------- fast: refusals without a server


def test_an_untracked_file_in_a_code_dep_is_refused_and_leftover_params_are_named(tmp_path: Path) -> None:
    """A new module not yet ``git add``ed inside a code folder a stage depends on: DVC hashes it into the dep, but
    the workers' clones of the commit lack it. It used to be accepted (only tracked changes were refused) and the
    chain ended, after every stage, with an unexplained ``dvc status is not clean``; a stray file there in a
    worker clone changed that stage's lock entry. Now both clones refuse naming the file; a git-ignored file
    (``__pycache__``) is no change. And the params a clone's files change against its commit (an earlier chain's
    ``-S`` overrides, left as ``dvc exp run -S`` leaves them) are named for the chain's log."""
    import logging

    from flows.dag import read_stage_graph
    from flows.machines import Refused, bring_clone_to, capture_run_state, params_changed_since_commit
    from flows.sweep import check_sweep_can_start

    stages = {**demo_stages()}
    stages["prepare"] = {**stages["prepare"], "deps": ["src"]}
    origin = tmp_path / "origin"
    (origin / "src").mkdir(parents=True)  # write_demo_project commits what the folder holds
    (origin / "src" / "code.py").write_text("x = 1\n")
    (origin / "src" / ".gitignore").write_text("__pycache__/\n")
    origin = write_demo_project(origin, stages=stages, exist_ok=True)
    coordinator, worker = clone(origin, tmp_path / "coordinator"), clone(origin, tmp_path / "worker")
    logger = logging.getLogger("test")
    (coordinator / "src" / "__pycache__").mkdir()
    (coordinator / "src" / "__pycache__" / "code.cpython-311.pyc").write_bytes(b"ignored")
    state = capture_run_state(coordinator, read_stage_graph(coordinator))  # an ignored file: fine
    (coordinator / "src" / "new_module.py").write_text("y = 2\n")
    with pytest.raises(Refused, match=r"uncommitted changes in src/new_module.py: the workers run committed code"):
        capture_run_state(coordinator, read_stage_graph(coordinator))
    with pytest.raises(ValueError, match=r"uncommitted changes in src/new_module.py: the sweep runs"):
        check_sweep_can_start(coordinator, ["variant"], 1)
    (worker / "src" / "stray.py").write_text("z = 3\n")
    with pytest.raises(Refused, match=r"has uncommitted changes in src/stray.py: commit or discard them there"):
        bring_clone_to(worker, state, logger)

    # A data folder kept inside the repository, untracked (dataset.source: data/mine): an input, not code.
    stages_with_data = {**stages, "cam_train": {**stages["cam_train"], "deps": [*stages["cam_train"]["deps"], "mine"]}}
    data_project = tmp_path / "data_project"
    (data_project / "src").mkdir(parents=True)
    (data_project / "src" / "code.py").write_text("x = 1\n")
    data_project = write_demo_project(data_project, stages=stages_with_data, exist_ok=True)
    (data_project / "mine").mkdir()
    for index in range(40):
        (data_project / "mine" / f"image_{index}.jpg").write_bytes(b"jpeg")
    capture_run_state(data_project, read_stage_graph(data_project))
    for index in range(8):  # many new modules: the refusal names five and counts the rest, on one line
        (data_project / "src" / f"module_{index}.py").write_text("y = 2\n")
    with pytest.raises(Refused) as many:
        capture_run_state(data_project, read_stage_graph(data_project))
    assert "src/module_0.py src/module_1.py src/module_2.py src/module_3.py src/module_4.py (and 3 more)" in str(
        many.value) and "git add them && git commit" in str(many.value) and "\n" not in str(many.value)

    assert params_changed_since_commit(coordinator, ["params.yaml"]) == []
    (coordinator / "params.yaml").write_text("scale: 0.9\nextra: 1\n")
    assert params_changed_since_commit(coordinator, ["params.yaml"]) == [
        "params.yaml: extra (absent) -> 1", "params.yaml: scale 0.5 -> 0.9"]


def test_merging_lock_entries_keeps_yaml_1_2_strings_so_dvc_status_stays_clean(tmp_path: Path) -> None:
    """DVC writes dvc.lock in YAML 1.2 and leaves ``off`` and ``1:30`` unquoted; the merge read it with PyYAML
    (YAML 1.1: ``False`` and 90) and wrote those back, so ``dvc status`` saw changed params after a chain. Now
    the worker's entry and the coordinator's re-written lock keep them as DVC wrote them: status clean."""
    import threading

    from flows.machines import merge_lock_entry, read_lock

    stages = {**demo_stages()}
    stages["eval_a"] = {**stages["eval_a"], "params": ["scale", "crf", "window"]}
    project = write_demo_project(tmp_path / "project", stages=stages)
    (project / "params.yaml").write_text("scale: 0.5\ncrf: off\nwindow: 1:30\n")
    run([*DVC, "repro", "--quiet"], project)
    lock_text = (project / "dvc.lock").read_text()
    assert "crf: off" in lock_text and "window: 1:30" in lock_text  # as DVC writes them
    entry = read_lock(lock_text)["stages"]["eval_a"]  # what a worker sends
    assert entry["params"]["params.yaml"]["crf"] == "off" and entry["params"]["params.yaml"]["window"] == "1:30"
    merge_lock_entry(project, "eval_a", entry, threading.Lock())
    merged = (project / "dvc.lock").read_text()
    assert "crf: off" in merged and "window: 1:30" in merged
    assert dvc_status_clean(project)


def test_worker_refuses_a_dirty_clone_and_an_unknown_commit(tmp_path: Path) -> None:
    import logging

    from flows.dag import read_stage_graph
    from flows.machines import Refused, bring_clone_to, capture_run_state, chain_lock

    origin = write_demo_project(tmp_path / "origin")
    coordinator, worker = clone(origin, tmp_path / "coordinator"), clone(origin, tmp_path / "worker")
    logger = logging.getLogger("test")
    (coordinator / "params.yaml").write_text("scale: 0.9\n")  # params travel
    state = capture_run_state(coordinator, read_stage_graph(coordinator))
    assert state.params == {"params.yaml": "scale: 0.9\n"}
    bring_clone_to(worker, state, logger)
    assert (worker / "params.yaml").read_text() == "scale: 0.9\n"

    (coordinator / "dvc.yaml").write_text((coordinator / "dvc.yaml").read_text() + "\n")  # code is not carried
    with pytest.raises(Refused, match=r"uncommitted changes in dvc.yaml: .*commit them first"):
        capture_run_state(coordinator, read_stage_graph(coordinator))
    run(["git", "commit", "--quiet", "-am", "not pushed"], coordinator)
    unknown = capture_run_state(coordinator, read_stage_graph(coordinator))
    host = re.escape(socket.gethostname())  # machines may share clone paths: the host says which one refused
    with pytest.raises(Refused, match=rf"commit [0-9a-f]{{12}} of the coordinator is unknown in worker clone {host}:.*git push"):
        bring_clone_to(worker, unknown, logger)
    # A fetch that fails (the repository unreachable for a moment) is not a refusal: the chain's retry may succeed.
    run(["git", "remote", "set-url", "origin", str(tmp_path / "unreachable")], worker)
    with pytest.raises(RuntimeError, match=r"(?s)not in worker clone .* and git fetch origin failed there: .*unreachable") as failed:
        bring_clone_to(worker, unknown, logger)
    assert not isinstance(failed.value, Refused)
    run(["git", "remote", "set-url", "origin", str(origin)], worker)
    (worker / "flows.py").write_text("x = 1\n")
    run(["git", "add", "flows.py"], worker)
    with pytest.raises(Refused, match=r"has uncommitted changes in flows.py"):
        bring_clone_to(worker, state, logger)
    with pytest.raises(Refused, match="coordinator's own clone"):
        bring_clone_to(coordinator, state, logger)
    # A second chain on the same coordinator clone: refused in one line while the first holds the lock.
    with chain_lock(coordinator):
        with pytest.raises(Refused) as refused:
            with chain_lock(coordinator):
                pass
    assert "another chain is already running on" in str(refused.value) and "\n" not in str(refused.value)


def test_one_stage_per_worker_clone_and_inputs_the_lock_does_not_name_are_refused() -> None:
    """Two documented promises, each on its own: a second stage on a clone that is busy is refused in one line
    naming the holder, and a stage whose upstream dep ran with another hash than the coordinator's lock names
    fails rather than merge."""
    import tempfile

    from flows.dag import StageSpec
    from flows.machines import CLONE_LOCK, Refused, check_inputs_match, held_file_lock

    with tempfile.TemporaryDirectory() as folder:
        lock = Path(folder) / CLONE_LOCK
        with held_file_lock(lock, "worker clone X is busy with another stage"):
            with pytest.raises(Refused) as refused:
                with held_file_lock(lock, "worker clone X is busy with another stage"):
                    pass
        message = str(refused.value)
        assert message.startswith(f"worker clone X is busy with another stage (pid {os.getpid()} on ")
        assert message.endswith("; wait for it to end or cancel it") and "\n" not in message
        with held_file_lock(lock, "free again"):  # released when the holder ended
            pass

    stage = StageSpec("eval_a", "", ("artifacts/model.txt",), (), (), ("cam_train",))
    sent = {"stages": {"cam_train": {"outs": [{"path": "artifacts/model.txt", "md5": "aaa"}]}}}
    check_inputs_match(stage, sent, {"deps": [{"path": "artifacts/model.txt", "md5": "aaa"}]})
    with pytest.raises(RuntimeError) as wrong:
        check_inputs_match(stage, sent, {"deps": [{"path": "artifacts/model.txt", "md5": "bbb"}]})
    assert str(wrong.value) == ("stage 'eval_a' ran on inputs its lock entry does not name: artifacts/model.txt ran with "
                                "md5 bbb, the coordinator's dvc.lock names aaa")


def test_a_worker_pulls_every_input_of_pseudo_masks_and_seg_train() -> None:
    """A pool worker pulls the outputs of upstream stages that a stage lists (``pull_targets`` on the project's own
    graph). ``pseudo_masks`` loads the trained WeakCLIP, which reads the CLIP artifact its file records: with
    ``artifacts/clip`` unlisted, a GPU clone that had not run ``weakclip_train`` pulled only the WeakCLIP file and
    stopped on the missing CLIP. ``seg_train`` opens the prepared dataset (its labels file and split lists), of
    which it listed only the images."""
    from flows.dag import read_stage_graph
    from flows.machines import pull_targets

    graph = read_stage_graph(REPO_ROOT)
    assert "clip" in graph.by_name()["pseudo_masks"].upstream
    assert {"artifacts/clip", "artifacts/weakclip"} <= set(pull_targets(graph.by_name()["pseudo_masks"], graph))
    prepared = "data/prepared/synthetic"
    for stage in ("seg_train@pseudo", "seg_train@gt"):
        assert {f"{prepared}/labels.json", f"{prepared}/ImageSets", f"{prepared}/JPEGImages"} <= \
            set(pull_targets(graph.by_name()[stage], graph)), stage


def test_a_chain_whose_external_inputs_the_coordinator_lacks_is_refused_before_any_stage(tmp_path: Path) -> None:
    """``dataset.source``, ``clip.weights``, ``cam.arch.pretrained`` are deps outside the repository; the
    coordinator's closing ``dvc status`` hashes them, so a coordinator without them used to fail only after every
    stage had run on the workers."""
    from flows.dag import read_stage_graph
    from flows.machines import Refused, check_external_deps_here, external_deps

    weights = tmp_path / "elsewhere" / "deit_small.pth"
    stages = {"cam_train": {"cmd": "python -c \"open('model.txt', 'w').write('m')\"", "deps": [str(weights)],
                            "outs": ["model.txt"]}}
    coordinator = write_demo_project(tmp_path / "coordinator", stages=stages)
    graph = read_stage_graph(coordinator)
    assert [str((coordinator / dep).resolve()) for dep in external_deps(graph)] == [str(weights)]
    with pytest.raises(Refused) as refused:
        check_external_deps_here(coordinator, graph)
    assert str(refused.value).startswith(f"{coordinator}: the chain's external input(s) {weights} do not exist on the "
                                         "coordinator; ")
    weights.parent.mkdir()
    weights.write_bytes(b"weights")
    check_external_deps_here(coordinator, graph)


def test_a_stage_up_to_date_in_the_lock_is_pulled_not_rerun_on_a_fresh_worker_clone(tmp_path: Path) -> None:
    """A worker clone without a stage's outputs (a fresh clone, another GPU's clone) used to run the stage again
    although the coordinator's dvc.lock named it up to date: hours of GPU for outputs the remote already holds.
    Now the outputs are pulled and DVC skips it; only outputs the remote lacks make it run. The demo's cam_train
    writes ``env/cam_train.txt`` whenever it runs (not a DVC output): the witness. Its cache: false dvclive outputs
    travel from the coordinator, and a folder output the coordinator gets back replaces its old copy whole."""
    import logging

    from flows.dag import read_stage_graph
    from flows.machines import capture_run_state, carried_inputs, run_stage_on_worker, write_files

    origin = write_demo_project(tmp_path / "origin", remote_dir=tmp_path / "nfs-remote")
    coordinator = clone(origin, tmp_path / "coordinator")
    run([*DVC, "repro"], coordinator)
    run([*DVC, "push", "prepare"], coordinator)  # cam_train's own outputs are not on the remote yet
    graph = read_stage_graph(coordinator)
    cam_train = graph.by_name()["cam_train"]
    state = capture_run_state(coordinator, graph)  # the lock and the outputs: uncommitted, as mid-chain
    state = type(state)(**{**state.to_json(), "files": carried_inputs(cam_train, graph, coordinator)})
    assert sorted(state.files) == ["dvclive/cam_train/metrics.json", "dvclive/cam_train/plots/metrics/loss.tsv"]
    coordinator_entry = yaml.safe_load(state.lock)["stages"]["cam_train"]
    logger = logging.getLogger("test")

    first = clone(origin, tmp_path / "gpu0")  # the remote lacks cam_train's outputs: it runs, then pushes them
    result = run_stage_on_worker("cam_train", state, first, "shared", logger)
    assert (first / "env" / "cam_train.txt").is_file()
    assert result["entry"]["outs"] == coordinator_entry["outs"]

    second = clone(origin, tmp_path / "gpu1")  # now on the remote: pulled, not re-made
    result = run_stage_on_worker("cam_train", state, second, "shared", logger)
    assert not (second / "env").exists(), "cam_train ran again although the coordinator's lock names it up to date"
    assert result["entry"] == coordinator_entry
    assert (second / "artifacts" / "model.txt").read_text() == str(sum(range(10)))
    assert json.loads(run([*DVC, "status", "--json", "cam_train"], second)) == {}  # its outputs, dvclive too

    # Another version of the output in this clone (an earlier attempt's, given up for lost while its retry
    # finished on another worker; a run with other -S params): dvc status says "modified", and the stage used to
    # run again (hours of GPU, new hashes downstream). The lock's version is pulled over it instead.
    (second / "artifacts" / "model.txt").write_text("44")
    result = run_stage_on_worker("cam_train", state, second, "shared", logger)
    assert not (second / "env").exists(), "cam_train ran again over a stale copy of its output"
    assert (second / "artifacts" / "model.txt").read_text() == str(sum(range(10)))
    assert result["entry"] == coordinator_entry

    stale = coordinator / "dvclive" / "cam_train" / "plots" / "metrics" / "accuracy.tsv"  # an earlier run's log
    stale.write_text("step\taccuracy\n0\t0.5\n")
    write_files(coordinator, result["files"], replaced=cam_train.uncached)
    assert not stale.exists() and dvc_status_clean(coordinator)


def test_data_tracked_by_a_dvc_file_is_pulled_on_a_fresh_worker_clone(tmp_path: Path) -> None:
    """Data the user tracks with ``dvc add`` (a ``.dvc`` file in git, the data on the remote) that a stage reads:
    a worker's fresh clone holds only the ``.dvc`` file, and the pulls covered upstream stages' outputs only, so
    the stage failed there on a missing dependency. Now the worker pulls the tracked data the stage reads."""
    import logging

    from flows.dag import read_stage_graph
    from flows.machines import RemoteFailed, capture_run_state, pull_targets, run_stage_on_worker, tracked_targets

    code = "import pathlib; pathlib.Path('count.txt').write_text(str(len(sorted(pathlib.Path('data/extra').iterdir()))))"
    origin = write_demo_project(tmp_path / "origin", remote_dir=tmp_path / "nfs-remote",
                                stages={"count_extra": {"cmd": f'python -c "{code}"', "deps": ["data/extra"],
                                                        "outs": ["count.txt"]}})
    (origin / "data" / "extra").mkdir(parents=True)
    for name in ("a.txt", "b.txt", "c.txt"):
        (origin / "data" / "extra" / name).write_text(name)
    run([*DVC, "add", "data/extra"], origin)
    run(["git", "add", "data/extra.dvc", "data/.gitignore"], origin)
    run(["git", "commit", "--quiet", "-m", "extra data"], origin)
    run([*DVC, "push"], origin)

    coordinator = clone(origin, tmp_path / "coordinator")
    graph = read_stage_graph(coordinator)
    worker = clone(origin, tmp_path / "worker")
    assert not (worker / "data" / "extra").exists()
    result = run_stage_on_worker("count_extra", capture_run_state(coordinator, graph), worker, "shared",
                                 logging.getLogger("test"))
    assert (worker / "count.txt").read_text() == "3"
    assert graph.tracked_data == ("data/extra",)
    assert tracked_targets(graph.by_name()["count_extra"], graph) == ["data/extra"]
    assert pull_targets(graph.by_name()["count_extra"], graph) == []  # no upstream stage made it

    # Data copied to each machine by hand and `dvc add`ed, never pushed: a remote without it. A clone holding the
    # copy runs on it, the copy kept (`dvc pull --force` of data the remote lacks deletes it); a clone without it
    # fails naming the remote.
    (tmp_path / "empty-remote").mkdir()
    for name, copied in (("copied", True), ("bare", False)):
        other = clone(origin, tmp_path / name)
        run([*DVC, "remote", "add", "--local", "empty", str(tmp_path / "empty-remote")], other)
        if copied:
            shutil.copytree(origin / "data" / "extra", other / "data" / "extra")
            run_stage_on_worker("count_extra", capture_run_state(coordinator, graph), other, "empty",
                                logging.getLogger("test"))
            assert (other / "count.txt").read_text() == "3"
            assert sorted(path.name for path in (other / "data" / "extra").iterdir()) == ["a.txt", "b.txt", "c.txt"]
        else:
            with pytest.raises(RemoteFailed, match="`dvc pull` against DVC remote 'empty'"):
                run_stage_on_worker("count_extra", capture_run_state(coordinator, graph), other, "empty",
                                    logging.getLogger("test"))
    assert set(result["entry"]["deps"][0]) >= {"path", "md5"} and result["entry"]["deps"][0]["path"] == "data/extra"

    # The user changes the data, `dvc add`s and pushes it and commits the .dvc file. The worker clone still holds
    # the version it pulled for the first chain: it used to run the stage on that old copy (its lock entry naming
    # the old hash) and the chain failed only at its very end. Now the commit's version is fetched and checked out.
    (origin / "data" / "extra" / "d.txt").write_text("d.txt")
    run([*DVC, "add", "data/extra"], origin)
    run([*DVC, "push"], origin)
    run(["git", "commit", "--quiet", "-am", "extra data: one more file"], origin)
    new_coordinator = clone(origin, tmp_path / "coordinator-2")
    new_state = capture_run_state(new_coordinator, read_stage_graph(new_coordinator))
    result = run_stage_on_worker("count_extra", new_state, worker, "shared", logging.getLogger("test"))
    assert (worker / "count.txt").read_text() == "4"
    assert result["entry"]["deps"][0]["md5"] == yaml.safe_load((origin / "data" / "extra.dvc").read_text())["outs"][0]["md5"]
    # A remote without the commit's version: refused naming the data, and the clone's copy left as it was.
    copied = tmp_path / "copied"
    with pytest.raises(RemoteFailed, match=r"holds another version of data/extra than the \.dvc file\(s\) name at commit "
                       r"[0-9a-f]{12}, and DVC remote 'empty' \(.*\) lacks that version: push it"):
        run_stage_on_worker("count_extra", new_state, copied, "empty", logging.getLogger("test"))
    assert sorted(path.name for path in (copied / "data" / "extra").iterdir()) == ["a.txt", "b.txt", "c.txt"]


def test_a_worker_clone_moved_to_another_commit_drops_its_training_checkpoints(tmp_path: Path) -> None:
    """An attempt given up for lost (its retry finished on another worker) leaves a checkpoint in its clone; a later
    chain at another commit used to resume it there, the new lock entry naming code that made only the last steps
    (since checkpoints record their code, it would now stop the stage instead). Moving to another commit clears
    them; at the same commit (a retry here) it is resumed."""
    import logging

    from flows.dag import read_stage_graph
    from flows.machines import CHECKPOINTS, bring_clone_to, capture_run_state
    from weakclip_core.training.checkpoint import CHECKPOINT_ROOT

    assert Path(CHECKPOINTS) == CHECKPOINT_ROOT
    origin = write_demo_project(tmp_path / "origin")
    coordinator, worker = clone(origin, tmp_path / "coordinator"), clone(origin, tmp_path / "worker")
    logger = logging.getLogger("test")
    left = worker / CHECKPOINTS / "cam_train" / "0123abcd" / "last.pt"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"weights of step 3000")
    (worker / CHECKPOINTS / ".locks").mkdir()
    (worker / CHECKPOINTS / ".locks" / "cam_train.lock").write_text("")
    bring_clone_to(worker, capture_run_state(coordinator, read_stage_graph(coordinator)), logger)
    assert left.read_bytes() == b"weights of step 3000"  # same commit: a retry resumes it

    (coordinator / "dvc.yaml").write_text((coordinator / "dvc.yaml").read_text().replace("range(10)", "range(12)"))
    run(["git", "commit", "--quiet", "-am", "prepare: 12 numbers"], coordinator)
    run(["git", "push", "--quiet", "origin", "HEAD:refs/heads/next"], coordinator)
    bring_clone_to(worker, capture_run_state(coordinator, read_stage_graph(coordinator)), logger)
    assert sorted(path.name for path in (worker / CHECKPOINTS).iterdir()) == [".locks"]
    assert (worker / CHECKPOINTS / ".locks" / "cam_train.lock").is_file()


def test_an_unreadable_metrics_file_names_its_stage_and_nothing_is_pushed(tmp_path: Path) -> None:
    """A stage on a worker whose metrics file is not JSON used to fail with a bare JSONDecodeError, after its
    outputs had been pushed; now it names the stage and the file, before anything is sent."""
    import logging

    from flows.dag import read_stage_graph
    from flows.machines import capture_run_state, run_stage_on_worker

    code = ("import pathlib; pathlib.Path('metrics').mkdir(exist_ok=True); pathlib.Path('out.txt').write_text('1'); "
            "pathlib.Path('metrics/bad.json').write_text('{oops')")
    remote = tmp_path / "nfs-remote"
    origin = write_demo_project(tmp_path / "origin", remote_dir=remote, stages={"bad": {
        "cmd": f'python -c "{code}"', "outs": ["out.txt"], "metrics": [{"metrics/bad.json": {"cache": False}}]}})
    coordinator, worker = clone(origin, tmp_path / "coordinator"), clone(origin, tmp_path / "worker")
    with pytest.raises(ValueError, match=r"metrics/bad.json: metrics file of stage 'bad' is not valid JSON"):
        run_stage_on_worker("bad", capture_run_state(coordinator, read_stage_graph(coordinator)), worker, "shared",
                            logging.getLogger("test"))
    assert not any(path.is_file() for path in remote.rglob("*"))


# --------------------------------------------------------------------------- slow: the pools


@pytest.mark.slow
def test_chain_over_two_machines_with_a_shared_path_remote(server: LocalServer, tmp_path: Path) -> None:
    from flows.chain import chain

    origin = write_demo_project(tmp_path / "origin", remote_dir=tmp_path / "nfs-remote")
    check_multi_machine_run(server, tmp_path, origin, remote="shared", params_text="scale: 0.7\n")

    # A second chain after a committed code change, on the same clones (each holds the first run's outputs
    # and lock): nothing stale survives; the lock equals a fresh one-folder dvc repro at the new commit.
    coordinator = tmp_path / "coordinator"
    dvc_yaml = coordinator / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace("range(10)", "range(12)"))
    run(["git", "commit", "--quiet", "-am", "prepare: 12 numbers"], coordinator)
    run(["git", "push", "--quiet", "origin", "HEAD:refs/heads/next"], coordinator)
    with workers(server, tmp_path / "cpu_worker", tmp_path / "gpu_worker"):
        chain(repo_dir=str(coordinator), dispatch="pools", remote="shared", commit=True, retry_delay_s=0.5,
              start_timeout_s=120, worker_lost_after_s=120, set_params=["scale=0.8"])  # like dvc exp run -S
    assert yaml.safe_load(run(["git", "show", "HEAD:params.yaml"], coordinator)) == {"scale": 0.8}  # committed with the lock
    second_reference = clone(coordinator, tmp_path / "reference-2")
    (second_reference / "dvc.lock").unlink()
    run([*DVC, "repro"], second_reference)
    assert lock_outs(coordinator) == lock_outs(second_reference)
    assert (coordinator / "artifacts" / "model.txt").read_text() == str(sum(range(12)))
    assert json.loads((coordinator / "metrics" / "eval_a.json").read_text())["miou"] == pytest.approx(0.8 * 66 / 100)
    assert dvc_status_clean(coordinator)
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], coordinator).strip() == ""


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


@pytest.mark.slow
def test_one_stage_per_gpu_and_no_worker_named(server: LocalServer, tmp_path: Path) -> None:
    from prefect import get_client

    from flows.chain import chain

    with get_client(sync_client=True) as client:
        assert client.read_work_queue_by_name(gpu_queue(0), work_pool_name=GPU_POOL).concurrency_limit == 1

    def gpu_sleeper(name: str) -> dict[str, object]:
        code = (
            "import time, pathlib; start = time.time(); time.sleep(4); "
            f"pathlib.Path('{tmp_path}/{name}.times').write_text(f'{{start}} {{time.time()}}'); "
            f"pathlib.Path('{name}.out').write_text(open('data/raw.txt').read())"
        )
        return {"cmd": f'python -c "{code}"', "deps": ["data/raw.txt"], "outs": [f"{name}.out"]}

    # Two GPU stages (names in the GPU table) that could run together; one GPU deployed.
    stages = {"prepare": demo_stages()["prepare"], "cam_train": gpu_sleeper("cam_train"), "cam_infer": gpu_sleeper("cam_infer")}
    origin = write_demo_project(tmp_path / "origin", stages=stages, remote_dir=tmp_path / "nfs-remote")
    clones = {name: clone(origin, tmp_path / name) for name in ("coordinator", "cpu_worker", "gpu_worker", "gpu_worker_b")}

    # No worker polls the CPU pool's queue: the first stage fails with a message that says so.
    state = chain(repo_dir=str(clones["coordinator"]), dispatch="pools", remote="shared", retries=2,
                  start_timeout_s=5, worker_lost_after_s=5, return_state=True)
    assert state.is_failed()
    assert f"no worker is polling pool '{CPU_POOL}' (queue '{CPU_STAGE_QUEUE}')" in state.message, state.message

    # Two GPU workers (two machines, two clones) poll queue gpu-0: only its concurrency limit keeps the stages apart.
    second_gpu_env = {"WEAKCLIP_REPO": str(REPO_ROOT), "WEAKCLIP_PROJECT": str(clones["gpu_worker_b"]), **GIT_IDENTITY}
    with (
        workers(server, clones["cpu_worker"], clones["gpu_worker"]),
        process_worker(server, GPU_POOL, work_queue=gpu_queue(0), extra_env=second_gpu_env),
    ):
        done = chain(repo_dir=str(clones["coordinator"]), dispatch="pools", remote="shared", max_parallel=2,
                     retry_delay_s=0.5, start_timeout_s=120, worker_lost_after_s=120, return_state=True)
    assert done.is_completed(), done.message
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        stage_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[done.state_details.flow_run_id])))
    gpu_runs = sorted((r for r in stage_runs if r.work_pool_name == GPU_POOL), key=lambda r: r.start_time)
    assert len(gpu_runs) == 2 and all(r.work_queue_name == gpu_queue(0) for r in gpu_runs)
    # Queue gpu-0 handed out the second run only after the first ended (not merely a lock inside a worker).
    assert gpu_runs[1].start_time >= gpu_runs[0].end_time, [(r.start_time, r.end_time) for r in gpu_runs]
    windows = [tuple(map(float, (tmp_path / f"{name}.times").read_text().split())) for name in ("cam_train", "cam_infer")]
    (a_start, a_end), (b_start, b_end) = windows
    assert a_end <= b_start or b_end <= a_start, f"two stages shared GPU 0: {windows}"
    assert dvc_status_clean(clones["coordinator"])


@pytest.mark.slow
def test_deploy_grows_and_shrinks_the_gpu_pool_and_the_chain_checks_each_gpu_queue(server: LocalServer) -> None:
    """``python -m flows.deploy --gpus N`` run again with a smaller N: the chain's GPU count (the GPU deployments
    in a row) follows it, the dropped GPU's queue is paused and its deployment gone, so no stage is sent to a
    GPU nobody deployed. The chain refuses a GPU queue that lost its limit of one or does not exist, naming the
    queue and the deploy command. The module's other tests expect one GPU: the test ends deployed as it began."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    from flows.chain import check_gpu_queues, deployed_gpu_count
    from flows.deploy import deploy
    from flows.machines import Refused
    from flows.resources import STAGE_FLOW_NAME, gpu_stage_deployment

    try:
        grown = deploy(gpus=2)
        assert grown[f"{GPU_POOL}/{gpu_queue(0)}"] == 1 and grown[f"{GPU_POOL}/{gpu_queue(1)}"] == 1
        assert deployed_gpu_count() == 2
        check_gpu_queues(2)

        shrunk = deploy(gpus=1)
        assert f"{GPU_POOL}/{gpu_queue(1)}" not in shrunk  # the returned map lists the queues that are not paused
        assert deployed_gpu_count() == 1
        with get_client(sync_client=True) as client:
            assert client.read_work_queue_by_name(gpu_queue(1), work_pool_name=GPU_POOL).is_paused
            with pytest.raises(ObjectNotFound):
                client.read_deployment_by_name(f"{STAGE_FLOW_NAME}/{gpu_stage_deployment(1)}")
            assert client.read_deployment_by_name(f"{STAGE_FLOW_NAME}/{gpu_stage_deployment(0)}").work_queue_name == gpu_queue(0)

            gpu_0 = client.read_work_queue_by_name(gpu_queue(0), work_pool_name=GPU_POOL)
            client.update_work_queue(gpu_0.id, concurrency_limit=None)  # two stages could now share GPU 0
            with pytest.raises(Refused, match=r"queue 'gpu-0' of pool 'weakclip-gpu' has concurrency limit None .*"
                                              r"run python -m flows\.deploy --gpus 1"):
                check_gpu_queues(1)
            client.update_work_queue(gpu_0.id, concurrency_limit=1)
            # Paused, a queue or pool is handed no run while its workers still poll: the stage would wait for hours.
            client.update_work_queue(gpu_0.id, is_paused=True)
            with pytest.raises(Refused, match=r"queue 'gpu-0' of pool 'weakclip-gpu' is paused: .*--gpus 1 resumes it"):
                check_gpu_queues(1)
            client.update_work_queue(gpu_0.id, is_paused=False)
            for pool in (CPU_POOL, GPU_POOL):
                client.update_work_pool(pool, WorkPoolUpdate(is_paused=True))
                with pytest.raises(Refused, match=rf"work pool '{pool}' is paused: .*prefect work-pool resume {pool}"):
                    check_gpu_queues(1)
                client.update_work_pool(pool, WorkPoolUpdate(is_paused=False))
        check_gpu_queues(1)
        with pytest.raises(Refused, match=r"queue 'gpu-1' of pool 'weakclip-gpu' is paused: .*--gpus 3 resumes it"):
            check_gpu_queues(3)  # the queue deploy --gpus 1 paused
        with get_client(sync_client=True) as client:
            client.update_work_queue(client.read_work_queue_by_name(gpu_queue(1), work_pool_name=GPU_POOL).id,
                                     is_paused=False)
        with pytest.raises(Refused, match=r"queue 'gpu-2' of pool 'weakclip-gpu' is missing .*--gpus 3"):
            check_gpu_queues(3)
    finally:
        deploy(gpus=1)


@pytest.mark.slow
def test_a_client_without_the_auth_string_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    monkeypatch.setenv("PREFECT_SERVER_API_AUTH_STRING", "weakclip:s3cret")
    with local_prefect_server(tmp_path / "home", health_auth="weakclip:s3cret") as running:
        def post(auth: str | None) -> int:
            request = urllib.request.Request(f"{running.api_url}/flows/filter", data=b"{}", method="POST",
                                             headers={"Content-Type": "application/json"})
            if auth:
                request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return response.status
            except urllib.error.HTTPError as error:
                return error.code

        assert post(None) == 401
        assert post("weakclip:wrong") == 401
        assert post("weakclip:s3cret") == 200
        env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
        env.update(PREFECT_HOME=str(tmp_path / "client"), PREFECT_API_URL=running.api_url)
        refused = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "ls"], env=env, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "401" in refused.stdout + refused.stderr
        env["PREFECT_API_AUTH_STRING"] = "weakclip:s3cret"
        allowed = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "ls"], env=env, capture_output=True, text=True, timeout=120)
        assert allowed.returncode == 0, allowed.stdout + allowed.stderr
        shutil.rmtree(tmp_path / "client", ignore_errors=True)


def test_params_dvc_rewrote_in_its_own_spelling_are_no_change(tmp_path: Path) -> None:
    """`-S train.lr=0.00003` is written by DVC in YAML 1.2 as `3e-05`: the chain's log of what the clone's params
    change against the commit reads both files as DVC does, so a value set to what it was is no change (YAML 1.1
    read `3e-05` as a string and listed `lr 3e-05 -> 3e-05`)."""
    from dvc.utils.hydra import apply_overrides

    from flows.machines import params_changed_since_commit

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.00003\n  steps: 10\n", encoding="utf-8")
    subprocess.run(["git", "-C", str(tmp_path), "add", "params.yaml"], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m",
                    "params"], check=True)
    apply_overrides(str(tmp_path / "params.yaml"), ["train.lr=0.00003", "train.steps=20"])
    assert "lr: 3e-05" in (tmp_path / "params.yaml").read_text(encoding="utf-8")
    assert params_changed_since_commit(tmp_path, ["params.yaml"]) == ["params.yaml: train.steps 10 -> 20"]

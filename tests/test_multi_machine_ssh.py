"""Issue #16 over DVC's SSH remote: the tiny chain split over two machines' workers, then the remote down.

The tiny chain is the repository's own dvc.yaml, code and the tiny params of tests/test_end_to_end.py (eleven
stages, nine on the GPU pool). Its reference is the session's one-folder ``dvc repro`` of the same project
(``tiny_chain_project``, tests/conftest.py), which the end-to-end tests check too. Every "machine" is its own git
clone with its own DVC cache; they share only the Prefect server and the DVC remote, a real OpenSSH server on
127.0.0.1 (Debian's openssh-server, a key made here). The demo-project faults, over a folder remote, are in
tests/test_multi_machine.py, whose helpers this module uses: a module of its own so the two halves, each minutes
long, can run on two pytest-xdist workers at once.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from flows.local_server import LocalServer, free_loopback_port, stop_process
from flows.resources import CPU_POOL, GPU_POOL
from test_multi_machine import (
    DVC,
    GIT_IDENTITY,
    SSHD,
    clone,
    deployed_server,
    dvc_status_clean,
    lock_outs,
    metrics_artifact,
    metrics_file,
    run,
    workers,
)


@pytest.fixture(autouse=True)
def git_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in GIT_IDENTITY.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with deployed_server(tmp_path_factory.mktemp("mm_ssh_prefect_home")) as running:
        yield running


@contextmanager
def ssh_server(root: Path) -> Iterator[dict[str, str]]:
    """Debian's OpenSSH server on 127.0.0.1:<free port>, host key and client key made here, key login only."""
    if not SSHD.exists():
        pytest.fail(f"{SSHD} is missing: the SSH remote test needs Debian's openssh-server (make test installs it as root)")
    root.mkdir(parents=True)
    for name in ("host_key", "client_key"):
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], root)
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    os.chmod(root / "authorized_keys", 0o600)
    port = free_loopback_port()
    user = os.environ.get("USER") or subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\nPidFile {root / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\nLogLevel ERROR\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)
    log = (root / "sshd.log").open("w")
    process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(root / "sshd_config")], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            probe = subprocess.run(
                ["ssh", "-i", str(root / "client_key"), "-p", str(port), "-o", "StrictHostKeyChecking=no",
                 "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", f"{user}@127.0.0.1", "true"],
                capture_output=True, text=True, check=False, timeout=30,
            )
            if probe.returncode == 0:
                break
            assert process.poll() is None and time.monotonic() < deadline, (
                f"sshd did not accept the key: {probe.stderr}\n{(root / 'sshd.log').read_text()}"
            )
            time.sleep(0.5)
        yield {"port": str(port), "user": user, "keyfile": str(root / "client_key"), "process": process}  # type: ignore[dict-item]
    finally:
        stop_process(process)
        log.close()


def add_ssh_remote(project: Path, ssh: dict[str, str], remote_path: Path) -> None:
    run([*DVC, "remote", "add", "--default", "ssh", f"ssh://127.0.0.1{remote_path}"], project)
    run([*DVC, "remote", "modify", "ssh", "port", ssh["port"]], project)
    run([*DVC, "remote", "modify", "ssh", "user", ssh["user"]], project)
    run([*DVC, "remote", "modify", "ssh", "keyfile", ssh["keyfile"]], project)
    run(["git", "add", ".dvc/config"], project)
    run(["git", "commit", "--quiet", "-m", "DVC remote over SSH"], project)


def tiny_origin(reference: Path, target: Path) -> Path:
    """The repository the machines clone: the tiny project's commit (dvc.yaml, code, tiny params; no outputs),
    taken from the one-folder reference project, which keeps its own outputs and lock untouched."""
    return clone(reference, target)


def check_tiny_chain_run(server: LocalServer, tmp_path: Path, origin: Path, remote: str, reference: Path) -> None:
    """The tiny chain split over the CPU and GPU workers' clones, the coordinator in a third clone: its lock outs
    equal the one-folder ``dvc repro``'s (``reference``), ``dvc status`` is clean there and in a fresh fourth
    clone that pulls everything, and each stage's metrics artifact in the API equals its metrics file."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.chain import chain
    from flows.dag import read_stage_graph
    from flows.resources import needs_gpu

    clones = {name: clone(origin, tmp_path / name) for name in ("coordinator", "cpu_worker", "gpu_worker")}
    coordinator = clones["coordinator"]
    with workers(server, clones["cpu_worker"], clones["gpu_worker"]):
        state = chain(repo_dir=str(coordinator), dispatch="pools", remote=remote, commit=True, retry_delay_s=0.5,
                      start_timeout_s=300, worker_lost_after_s=300, return_state=True)
    assert state.is_completed(), state.message
    graph = read_stage_graph(coordinator)
    assert set(lock_outs(coordinator)) == {stage.name for stage in graph.stages}
    assert lock_outs(coordinator) == lock_outs(reference)
    assert dvc_status_clean(coordinator)
    assert run(["git", "status", "--porcelain", "--untracked-files=no"], coordinator).strip() == ""
    with get_client(sync_client=True) as client:
        stage_runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
        # Split over both machines: every GPU stage ran on the GPU pool (the GPU worker's clone), the rest on the CPU one.
        pools = {run_.parameters["stage_name"]: run_.work_pool_name for run_ in stage_runs}
        assert pools == {stage.name: GPU_POOL if needs_gpu(stage.name) else CPU_POOL for stage in graph.stages}
        # Each stage's metrics artifact in the API equals its metrics file.
        for stage in graph.stages:
            for path in stage.metrics:
                if not path.endswith(".json"):
                    continue
                assert metrics_artifact(client, stage.name, path) == metrics_file(coordinator / path), (stage.name, path)
    fresh = clone(coordinator, tmp_path / "fresh")
    run([*DVC, "pull"], fresh)
    assert dvc_status_clean(fresh)
    assert lock_outs(fresh) == lock_outs(reference)



@pytest.mark.slow
def test_tiny_chain_over_two_machines_with_an_ssh_remote_then_the_remote_down(
    server: LocalServer, tiny_chain_project: tuple[Path, dict, str], tmp_path: Path
) -> None:
    """The same over DVC's SSH remote against a real OpenSSH server; then the server stops: the next chain fails
    naming the remote and the coordinator's lock is unchanged."""
    from flows.chain import chain

    reference = tiny_chain_project[0]
    with ssh_server(tmp_path / "sshd") as ssh:
        origin = tiny_origin(reference, tmp_path / "origin")
        add_ssh_remote(origin, ssh, tmp_path / "ssh-remote")
        check_tiny_chain_run(server, tmp_path, origin, "ssh", reference)
        assert any(path.is_file() for path in (tmp_path / "ssh-remote").rglob("*")), "nothing was pushed over SSH"
        coordinator = tmp_path / "coordinator"
        run(["git", "push", "--quiet", "origin", "HEAD:refs/heads/chain-result"], coordinator)  # where workers fetch
        lock_before = (coordinator / "dvc.lock").read_text()
        params = yaml.safe_load((coordinator / "params.yaml").read_text())
        params["weakclip"]["train"]["iterations"] += 1  # weakclip_train and everything after it must re-run
        (coordinator / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        stop_process(ssh["process"])  # type: ignore[arg-type]
        with workers(server, tmp_path / "cpu_worker", tmp_path / "gpu_worker"):
            state = chain(
                repo_dir=str(coordinator), dispatch="pools", remote="ssh", retries=0,
                start_timeout_s=120, worker_lost_after_s=300, return_state=True,
            )
    assert state.is_failed()
    assert "DVC remote 'ssh' (ssh://127.0.0.1" in state.message, state.message
    assert (coordinator / "dvc.lock").read_text() == lock_before

"""The flows against a tiny DVC project in tmp_path (flows.demo): DAG, lock, failures, remote, sweep.

The references are DVC's own CLI (``dvc dag --dot``, ``dvc repro``, ``dvc exp show``)
and hand-worked numbers, never the flows' code. Flows run in this process
against a Prefect server on 127.0.0.1 with its home in a temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

# flows.chain imports prefect's flow machinery, which sets up Prefect's console logging on the sys.stderr of the
# moment: imported here, at collection, and not first inside a test using capsys, whose stream is closed after
# that test (every later Prefect log line then failed, to a RecursionError in the flow tests).
import flows.chain  # noqa: F401
from flows.dag import read_stage_graph
from flows.demo import demo_stages, write_demo_project
from flows.resources import GPU_POOL, needs_gpu, place_stages
from flows.stage_run import artifact_key, flatten_metrics

REPO_ROOT = Path(__file__).resolve().parent.parent
DVC = [sys.executable, "-m", "dvc"]


def tool_env() -> dict[str, str]:
    return dict(
        os.environ,
        DVC_NO_ANALYTICS="1",
        PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),
        GIT_AUTHOR_NAME="flows test",
        GIT_AUTHOR_EMAIL="flows@example.invalid",
        GIT_COMMITTER_NAME="flows test",
        GIT_COMMITTER_EMAIL="flows@example.invalid",
    )


def run(command: list[str], cwd: Path) -> str:
    completed = subprocess.run(command, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    assert completed.returncode == 0, f"{command} failed:\n{completed.stdout}\n{completed.stderr}"
    return completed.stdout + completed.stderr


def dot_edges(dot: str) -> set[tuple[str, str]]:
    return set(re.findall(r'"([^"]+)" -> "([^"]+)";', dot))


def lock_hashes(repo: Path) -> dict[str, dict[str, str]]:
    """``{stage: {out path: md5}}`` from dvc.lock: what the outputs' content hashes were."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {
        stage: {out["path"]: out["md5"] for out in entry.get("outs", [])} for stage, entry in lock["stages"].items()
    }


# --- fast: the graph, the placement table, small helpers -------------------------------------------------


def test_flow_dag_equals_dvc_dag(tmp_path: Path) -> None:
    project = write_demo_project(tmp_path / "demo")
    graph = read_stage_graph(project)
    dvc_edges = dot_edges(run([*DVC, "dag", "--dot"], project))
    assert graph.edges() == dvc_edges
    assert dvc_edges == {
        ("prepare", "cam_train"),
        ("cam_train", "eval_a"),
        ("cam_train", "eval_b"),
        ("eval_a", "summary"),
        ("eval_b", "summary"),
    }
    order = graph.names()
    assert set(order) == set(demo_stages())
    assert all(order.index(parent) < order.index(child) for parent, child in dvc_edges)
    by_name = graph.by_name()
    assert by_name["summary"].metrics == ("metrics/summary.json",)
    assert graph.descendants("cam_train") == {"eval_a", "eval_b", "summary"}
    assert graph.select(["eval_b"]).names() == ["prepare", "cam_train", "eval_b"]


def test_foreach_stage_addresses_match_dvc_dag(tmp_path: Path) -> None:
    stages = {
        "prepare": demo_stages()["prepare"],
        "seg_train": {
            "foreach": ["pseudo", "gt"],
            "do": {"cmd": "python -c \"open('seg_${item}.txt', 'w').write('${item}')\"", "deps": ["data/raw.txt"], "outs": ["seg_${item}.txt"]},
        },
    }
    project = write_demo_project(tmp_path / "demo", stages=stages)
    graph = read_stage_graph(project)
    assert graph.edges() == dot_edges(run([*DVC, "dag", "--dot"], project))
    assert set(graph.names()) == {"prepare", "seg_train@pseudo", "seg_train@gt"}


def test_gpu_table_on_the_real_chain() -> None:
    """The project's own dvc.yaml: exactly the training/inference stages go to the GPU pool."""
    graph = read_stage_graph(REPO_ROOT)
    gpu_stages = {name for name in graph.names() if needs_gpu(name)}
    assert gpu_stages == {"clip", "cam_train", "cam_infer", "weakclip_train", "pseudo_masks", "seg_train@pseudo", "seg_train@gt",
                          "seg_eval@pseudo", "seg_eval@gt"}
    placements = place_stages(graph.names(), gpu_count=2)
    assert {name for name, placement in placements.items() if placement.pool == GPU_POOL} == gpu_stages
    gpu_order = [name for name in graph.names() if name in gpu_stages]
    assert [placements[name].gpu_index for name in gpu_order] == [i % 2 for i in range(len(gpu_order))]
    assert placements["seg_train@gt"].deployment.startswith("stage/stage-gpu-")
    assert all(placement.pool != GPU_POOL for placement in place_stages(graph.names(), gpu_count=0).values())


def test_chain_overrides_are_read_as_dvc_exp_run_reads_them(tmp_path: Path) -> None:
    """``chain(set_params=...)`` / ``python -m flows.chain -S``: DVC's own -S code, so a misspelt key is refused
    (it used to be added silently, and committed with ``--commit``), ``+key`` adds, ``~key`` removes, values are
    YAML-typed and comments stay."""
    from flows.machines import Refused, apply_param_overrides

    params = tmp_path / "params.yaml"
    params.write_text("scale: 0.5  # the scale\nseg:\n  model: deeplabv2  # which\n")
    apply_param_overrides(tmp_path, ["scale=0.9", "seg.model=deeplabv3plus", "+extra=2"])
    assert params.read_text() == "scale: 0.9  # the scale\nseg:\n  model: deeplabv3plus # which\nextra: 2\n"
    apply_param_overrides(tmp_path, ["~extra"])
    assert yaml.safe_load(params.read_text()) == {"scale": 0.9, "seg": {"model": "deeplabv3plus"}}
    before = params.read_text()
    for bad, says in ((["scael=0.9"], "Could not override 'scael'"), (["scale.x=1"], "Could not override 'scale.x'"),
                      (["scale"], "expected [file:]key.path=value"), (["other.yaml:scale=1"], "does not exist")):
        with pytest.raises(Refused) as refused:
            apply_param_overrides(tmp_path, bad)
        assert says in str(refused.value) and "\n" not in str(refused.value), refused.value
    assert params.read_text() == before  # nothing written by a refused override


def test_chain_cli_passes_every_option_to_the_deployment_and_refuses_what_it_would_ignore(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m flows.chain --deployment chain/chain`` used to drop ``--start-timeout`` silently (and ignore
    ``--repo-dir`` / ``--dispatch``, which the deployment fixes); ``--commit`` without pools did nothing."""
    import types

    import prefect.deployments

    from flows.chain import main

    sent: dict = {}

    def fake_run_deployment(name: str, parameters: dict, **_: object) -> object:
        sent.update(name=name, parameters=parameters)
        state = types.SimpleNamespace(name="Completed", is_completed=lambda: True)
        return types.SimpleNamespace(name="fake-run", id="0", state=state)

    monkeypatch.setattr(prefect.deployments, "run_deployment", fake_run_deployment)
    assert main(["--deployment", "chain/chain", "--start-timeout", "900", "--remote", "nfs", "-S", "scale=0.8"]) == 0
    assert sent["name"] == "chain/chain"
    assert sent["parameters"] == {"max_parallel": 2, "retries": 2, "commit": False, "start_timeout_s": 900.0,
                                  "remote": "nfs", "set_params": ["scale=0.8"]}
    for argv, says in ((["--deployment", "chain/chain", "--repo-dir", "/elsewhere"], "--repo-dir cannot be given"),
                       (["--commit"], "--commit commits the coordinator's dvc.lock after a pools run"),
                       (["--max-parallel", "0"], "--max-parallel must be at least 1")):
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 2 and says in capsys.readouterr().err


def test_a_run_past_prefects_parameter_limit_is_refused_naming_its_largest_files() -> None:
    """The carried files travel as flow-run parameters, which a Prefect server stores up to 512 KiB by default
    (PREFECT_SERVER_API_MAX_PARAMETER_SIZE). The old 20 MB ceiling let a 1 MB run through to a 422 on every retry."""
    import base64

    from prefect.settings import get_current_settings

    from flows.machines import Refused, check_run_size

    assert get_current_settings().server.api.max_parameter_size == 512 * 1024  # the default this guards
    big = base64.b64encode(bytes(600 * 1024)).decode("ascii")
    parameters = {"stage_name": "summary", "run_state": {"lock": "schema: '2.0'\n", "params": {},
                                                         "files": {"dvclive/x/big.tsv": big, "metrics/a.json": "e30="}}}
    with pytest.raises(Refused) as refused:
        check_run_size("summary", parameters, 512 * 1024)
    message = str(refused.value)
    assert message.startswith("stage 'summary': its run carries ") and "dvclive/x/big.tsv, metrics/a.json" in message
    assert "more than the 524288 bytes" in message and "drop cache: false" in message
    check_run_size("summary", parameters, 0)  # 0: the server stores any size
    parameters["run_state"]["files"] = {"metrics/a.json": "e30="}
    check_run_size("summary", parameters, 512 * 1024)


def test_deployments_give_each_gpu_slot_its_gpus_and_hide_them_from_cpu_stages() -> None:
    """``--gpus 4 --gpus-per-stage 2``: two GPU deployments seeing GPUs 0,1 and 2,3, so a torchrun stage with
    ``runtime.nproc: 2`` (configs/voc.yaml) finds its two GPUs (every deployment used to see exactly one); the CPU
    stages' deployment sees none, so a CPU worker on a GPU box does not take GPU 0."""
    from flows.deploy import deployments_for, gpu_slots

    def environments(gpus: int, per_stage: int) -> dict[str, tuple[str, str]]:
        document = deployments_for(gpus, REPO_ROOT / "prefect.yaml", per_stage)
        return {entry["name"]: (entry["work_pool"]["work_queue_name"],
                                entry["work_pool"].get("job_variables", {}).get("env", {}).get("CUDA_VISIBLE_DEVICES"))
                for entry in document["deployments"] if entry["name"].startswith("stage-")}

    assert environments(4, 2) == {"stage-cpu": ("cpu", ""), "stage-gpu-0": ("gpu-0", "0,1"),
                                  "stage-gpu-1": ("gpu-1", "2,3")}
    assert environments(2, 1) == {"stage-cpu": ("cpu", ""), "stage-gpu-0": ("gpu-0", "0"), "stage-gpu-1": ("gpu-1", "1")}
    assert environments(0, 1) == {"stage-cpu": ("cpu", "")}
    assert gpu_slots(6, 3) == ["0,1,2", "3,4,5"]
    with pytest.raises(SystemExit, match="--gpus-per-stage 2 must be at least 1 and divide --gpus 3"):
        gpu_slots(3, 2)


def test_the_heartbeat_comes_several_times_within_the_lost_window() -> None:
    """The heartbeat was a fixed 10 s: with ``worker_lost_after_s`` 15 one heartbeat 5 s late (a loaded machine)
    crashed a healthy stage. Now four heartbeats fit in the window (10 s at most, the default's), and a window that
    could hold none is refused."""
    from flows.chain import PoolSettings

    assert PoolSettings().heartbeat_s == 10.0  # the defaults (a 120 s window): 12 heartbeats to a window
    assert PoolSettings(worker_lost_after_s=20).heartbeat_s == 5.0
    assert PoolSettings(worker_lost_after_s=15).heartbeat_s == 3.75
    assert PoolSettings(start_timeout_s=60, worker_lost_after_s=8, worker_repo_dir="/clones/w").heartbeat_s == 2.0
    with pytest.raises(ValueError, match="must be positive, got 300 and 0"):
        PoolSettings(start_timeout_s=300, worker_lost_after_s=0)


def test_a_worker_whose_clock_is_behind_is_not_taken_for_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker-lost check read "coordinator's now minus the worker's log timestamp": a worker clock 10 minutes
    behind looked silent for 600 s while it logged every 10 s, and its stage was crashed and re-run. Now only
    whether the timestamp moves counts, timed by the coordinator's own monotonic clock."""
    import datetime as dt

    import flows.chain
    from flows.chain import SilenceClock

    now = [1000.0]
    monkeypatch.setattr(flows.chain.time, "monotonic", lambda: now[0])
    behind = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=10)  # the worker's clock
    clock = SilenceClock()
    for beat in range(1, 6):  # a heartbeat every 10 s of the worker's (slow) clock
        now[0] += 10.0
        assert clock.silent_s(behind + dt.timedelta(seconds=10 * beat)) == 0.0
    now[0] += 130.0  # then nothing new for 130 s: silent that long, whatever the clocks say
    assert clock.silent_s(behind + dt.timedelta(seconds=50)) == 130.0
    assert SilenceClock().silent_s(None) == 0.0  # nothing seen yet: counted from now


class ScriptedServer:
    """A stand-in for Prefect's sync client in ``wait_for_stage_run``: each poll takes the next scripted answer,
    an exception (the server out of reach) or ``(state, newest log time, queue last_polled)``, optionally with
    ``"queue paused"`` or ``"pool paused"`` after them. Time is the test's:
    every ``time.sleep`` of the poll loop moves the monotonic clock by its argument."""

    def __init__(self, script: list, monkeypatch: pytest.MonkeyPatch) -> None:
        import logging
        import types

        import prefect

        from flows import chain as chain_module

        self.script, self.answer, self.set_states = list(script), None, []
        self.now = [0.0]
        monkeypatch.setattr(chain_module.time, "monotonic", lambda: self.now[0])
        monkeypatch.setattr(chain_module.time, "sleep", lambda seconds: self.now.__setitem__(0, self.now[0] + seconds))
        monkeypatch.setattr(prefect, "get_client", lambda sync_client: self)
        monkeypatch.setattr(chain_module, "get_run_logger", lambda: logging.getLogger("wait"))
        self.namespace = types.SimpleNamespace

    def __enter__(self) -> "ScriptedServer":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read_flow_run(self, flow_run_id: object) -> object:
        answer = self.script.pop(0)
        if isinstance(answer, Exception):
            raise answer
        self.answer = answer
        return self.namespace(id=flow_run_id, state=answer[0])

    def read_artifacts(self, **_: object) -> list:
        answer = self.script.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return [self.namespace(data=answer)]

    def read_logs(self, **_: object) -> list:
        return [self.namespace(timestamp=self.answer[1])]

    def read_work_queue_by_name(self, name: str, work_pool_name: str) -> object:
        """The scripted ``last_polled``; paused when the answer has a fourth item ``"queue paused"``."""
        return self.namespace(last_polled=self.answer[2], is_paused=self.answer[3:] == ("queue paused",))

    def read_work_pool(self, name: str) -> object:
        return self.namespace(is_paused=self.answer[3:] == ("pool paused",))

    def set_flow_run_state(self, flow_run_id: object, state: object, force: bool = False) -> object:
        """Accepted, unless the script's next answer is a final state: the run ended first, and (unforced) the
        server aborts a Crashed proposed over it; over a Cancelling run it rejects anything but Cancelled (both
        pinned on a real server by ``test_a_completed_run_is_not_overwritten_by_crashed``)."""
        from prefect.client.schemas.responses import SetStateStatus

        self.set_states.append(state)
        if not force and self.answer[0].type.value == "CANCELLING" and state.type.value != "CANCELLED":
            return self.namespace(status=SetStateStatus.REJECT)  # Prefect's rule: Cancelling ends as Cancelled
        ended = not force and self.script and not isinstance(self.script[0], Exception) and self.script[0][0].is_final()
        return self.namespace(status=SetStateStatus.ABORT if ended else SetStateStatus.ACCEPT)


def test_the_chain_waits_out_a_server_outage_without_taking_the_worker_for_lost(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The server restarting for 200 s while a stage runs: the poll loop's ``read_flow_run`` raised a connection
    error, the task failed, and its retry sent the stage again beside the run still going on its worker. Now the
    chain waits; and since the worker could not post its heartbeat either, its silence starts again when the
    server is back (otherwise 200 s > ``worker_lost_after_s`` would crash the run at once)."""
    import datetime as dt
    import uuid

    import httpx
    from prefect.states import Completed, Running

    from flows.chain import PoolSettings, wait_for_stage_run
    from flows.resources import Placement

    beat = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    running, completed = Running(), Completed()
    script = [(running, beat, None), (running, beat + dt.timedelta(seconds=10), None)]
    script += [httpx.ConnectError("connection refused")] * 200
    script += [(running, beat + dt.timedelta(seconds=10), None)] * 60  # the same newest line for 60 s, then
    script += [(running, beat + dt.timedelta(seconds=300), None), (completed, beat, None)]
    server = ScriptedServer(script, monkeypatch)
    caplog.set_level("INFO", logger="wait")
    settings = PoolSettings(start_timeout_s=30, worker_lost_after_s=120)
    flow_run = wait_for_stage_run("cam_train", Placement("weakclip-gpu", "stage/stage-gpu-0", 0, "gpu-0"), uuid.uuid4(), settings)
    assert flow_run.state is completed and server.set_states == [] and server.script == []
    outage = [record.getMessage() for record in caplog.records if "out of reach" in record.getMessage()]
    assert len(outage) == 1 and "connection refused" in outage[0]  # said once per outage
    assert any("answers again after 200 s" in record.getMessage() for record in caplog.records)


def test_a_completed_stages_result_is_read_after_a_server_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage completed, then the server went away for 30 s as the chain read its result: the task failed and
    its retry sent the finished stage to a worker again. Now the read waits for the server."""
    import uuid

    import httpx

    from flows.chain import PoolSettings, _stage_result

    result = {"entry": {"cmd": "python train.py"}, "files": {}, "metrics": {}}
    server = ScriptedServer([httpx.ConnectError("connection refused")] * 30 + [result], monkeypatch)
    assert _stage_result("cam_train", uuid.uuid4(), PoolSettings()) == result and server.script == [] and server.now[0] == 30.0


def test_whether_a_worker_polls_is_read_from_last_polled_moving_not_from_its_value(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``last_polled`` is the server's clock: compared with the coordinator's, a server 10 minutes behind made
    every queue look unpolled, and a stage waiting its turn in a busy queue was refused as "no worker is polling".
    Now a ``last_polled`` that moves (a worker polls every 10 s) keeps the stage waiting; one that stands still
    past ``start_timeout_s`` and ``worker_lost_after_s`` is refused, naming the queue."""
    import datetime as dt
    import uuid

    from prefect.states import Completed, Running, Scheduled

    from flows.chain import PoolSettings, StageRefused, wait_for_stage_run
    from flows.resources import Placement

    placement = Placement("weakclip-gpu", "stage/stage-gpu-0", 0, "gpu-0")
    settings = PoolSettings(start_timeout_s=30, worker_lost_after_s=20)
    behind = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=10)
    scheduled, running, completed = Scheduled(), Running(), Completed()
    busy = [(scheduled, None, behind + dt.timedelta(seconds=10 * (second // 10))) for second in range(90)]
    server = ScriptedServer([*busy, (running, behind, None), (completed, behind, None)], monkeypatch)
    assert wait_for_stage_run("cam_train", placement, uuid.uuid4(), settings).state is completed
    assert server.set_states == []

    unpolled = [(scheduled, None, behind)] * 90
    server = ScriptedServer(unpolled, monkeypatch)
    with pytest.raises(StageRefused, match="no worker is polling pool 'weakclip-gpu' \\(queue 'gpu-0'\\)"):
        wait_for_stage_run("cam_train", placement, uuid.uuid4(), settings)
    assert 30 < server.now[0] <= 32 and server.set_states[0].is_cancelled()


@pytest.mark.parametrize("paused", ["queue paused", "pool paused"])
def test_a_queue_paused_while_the_chain_runs_refuses_the_stage_instead_of_waiting_days(
        monkeypatch: pytest.MonkeyPatch, paused: str) -> None:
    """Pausing a queue (a redeploy with fewer GPUs, the UI) after the chain's start-up check: its workers still
    poll it, so ``last_polled`` moves, the stage was "busy" and waited ``stage_timeout_s`` (7 days). Now, past
    ``start_timeout_s``, it is cancelled and refused naming the queue and how to resume it."""
    import datetime as dt
    import uuid

    from prefect.states import Scheduled

    from flows.chain import PoolSettings, StageRefused, wait_for_stage_run
    from flows.resources import Placement

    placement = Placement("weakclip-gpu", "stage/stage-gpu-0", 0, "gpu-0")
    now = dt.datetime.now(dt.timezone.utc)
    polled = [(Scheduled(), None, now + dt.timedelta(seconds=second), paused) for second in range(90)]
    server = ScriptedServer(polled, monkeypatch)
    with pytest.raises(StageRefused, match=r"stage 'cam_train': queue 'gpu-0' of pool 'weakclip-gpu' is paused \(or "
                                           r"its pool is\): .*prefect work-queue resume gpu-0 --pool weakclip-gpu"):
        wait_for_stage_run("cam_train", placement, uuid.uuid4(), PoolSettings(start_timeout_s=30, worker_lost_after_s=20))
    assert 30 < server.now[0] <= 32 and server.set_states[0].is_cancelled()


def test_a_run_that_completes_while_being_given_up_for_lost_stays_completed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Silent past ``worker_lost_after_s`` (its last log lines lost to a slow link) the run was forced to Crashed,
    also when it had completed between the chain's read and its write: the stage's finished result was thrown
    away and the retry ran it again. Now Crashed is proposed unforced; the server aborts it over a final state,
    and the chain takes the completed run."""
    import datetime as dt
    import uuid

    from prefect.states import Completed, Running

    from flows.chain import PoolSettings, wait_for_stage_run
    from flows.resources import Placement

    beat = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    running, completed = Running(), Completed()
    server = ScriptedServer([(running, beat, None)] * 122 + [(completed, beat, None)], monkeypatch)  # crashed at 121 s
    flow_run = wait_for_stage_run("cam_train", Placement("weakclip-gpu", "stage/stage-gpu-0", 0, "gpu-0"),
                                  uuid.uuid4(), PoolSettings(start_timeout_s=30, worker_lost_after_s=120))
    assert flow_run.state is completed
    assert [state.type.value for state in server.set_states] == ["CRASHED"]  # proposed once, aborted


def test_a_run_being_cancelled_whose_worker_is_gone_ends_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage cancelled by hand after its worker died stays Cancelling (no worker to finish the cancel), and Prefect
    rejects Crashed over Cancelling: the unforced proposal was rejected every second until ``stage_timeout_s``
    (7 days). Now a rejected proposal over a Cancelling run ends it Cancelled, which the chain reports, unretried."""
    import datetime as dt
    import uuid

    from prefect.states import Cancelled, Cancelling

    from flows.chain import PoolSettings, wait_for_stage_run
    from flows.resources import Placement

    beat = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    cancelling, cancelled = Cancelling(), Cancelled()
    server = ScriptedServer([(cancelling, beat, None)] * 122 + [(cancelled, beat, None)], monkeypatch)
    flow_run = wait_for_stage_run("cam_train", Placement("weakclip-gpu", "stage/stage-gpu-0", 0, "gpu-0"),
                                  uuid.uuid4(), PoolSettings(start_timeout_s=30, worker_lost_after_s=120))
    assert flow_run.state is cancelled and server.script == []
    assert [state.type.value for state in server.set_states] == ["CRASHED", "CANCELLED"]
    assert server.set_states[1].message.endswith("worker lost (it was being cancelled)")


def test_an_abandoned_command_is_stopped_with_every_process_it_started(tmp_path: Path) -> None:
    """A worker's command (dvc repro and the stage it started) once the chain gave the run up: the whole process
    group is stopped, the stage's child too (it would have written its file 3 s in), and the command fails
    saying why; an untouched ``abandon`` changes nothing."""
    import logging
    import threading
    import time

    from flows.dvc_cli import CommandFailed, run_command

    late = tmp_path / "late.txt"
    child = f"import time, pathlib; time.sleep(3); pathlib.Path({str(late)!r}).write_text('ran on')"
    parent = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); "
              "print('started', flush=True); time.sleep(60)")
    abandon = threading.Event()
    threading.Timer(1.0, abandon.set).start()
    started = time.monotonic()
    with pytest.raises(CommandFailed, match=r"stopped: the run was abandoned"):
        run_command([sys.executable, "-c", parent], tmp_path, logging.getLogger("test"), abandon=abandon)
    assert time.monotonic() - started < 15  # SIGTERM, not the 60 s sleep nor the 30 s grace
    time.sleep(4)
    assert not late.exists(), "the stage's child process ran on after its run was abandoned"
    done = run_command([sys.executable, "-c", "print('fine')"], tmp_path, logging.getLogger("test"),
                       abandon=threading.Event())
    assert done.lines == ("fine",)


def test_a_stage_whose_repository_lock_is_held_past_dvcs_3_s_still_records_its_result(tmp_path: Path) -> None:
    """``dvc repro`` drops its repository lock while the stage's command runs and takes it back to write
    dvc.lock; another DVC process in the same clone (the other branch hashing a large output, a pull) holding it
    for longer than DVC's 3 s of retries made the finished stage fail unrecorded (a retry then re-ran it whole).
    The stage now waits for the lock: its command ran once and dvc.lock names it."""
    import logging
    import time

    from flows.stage_run import execute_stage

    code = ("import time, pathlib; pathlib.Path('runs.txt').open('a').write('ran\\n'); time.sleep(3); "
            "pathlib.Path('slow.out').write_text(open('data/raw.txt').read())")
    stages = {"prepare": demo_stages()["prepare"],
              "slow": {"cmd": f'python -c "{code}"', "deps": ["data/raw.txt"], "outs": ["slow.out"]}}
    project = write_demo_project(tmp_path / "locked", stages=stages)
    (project / ".gitignore").write_text("/env/\n/runs.txt\n")
    run([*DVC, "repro", "prepare"], project)
    # Another process takes the repository lock 1 s into the stage's 3 s command and holds it 8 s.
    holder = ("import time; from dvc.repo import Repo; time.sleep(1); repo = Repo('.')\n"
              "with repo.lock:\n    print('held', flush=True); time.sleep(8)")
    other = subprocess.Popen([sys.executable, "-c", holder], cwd=project, env=tool_env(), stdout=subprocess.PIPE,
                             text=True)
    try:
        started = time.monotonic()
        execute_stage(read_stage_graph(project).by_name()["slow"], project, logging.getLogger("test"))
        assert time.monotonic() - started > 8, "the stage did not wait for the lock the other process held"
    finally:
        assert other.wait(timeout=60) == 0 and other.stdout is not None and other.stdout.read() == "held\n"
    assert (project / "runs.txt").read_text() == "ran\n"
    assert "slow" in lock_hashes(project)


def test_the_heartbeat_abandons_a_run_the_server_holds_as_crashed(caplog: pytest.LogCaptureFixture) -> None:
    """The worker's heartbeat reads its run's state: Running (or the server out of reach, said once per outage)
    goes on; once the chain has marked the run Crashed (worker lost), ``abandon`` is set and the heartbeat ends."""
    import logging
    import threading

    from prefect.states import Crashed, Running

    from flows.chain import _heartbeat

    answers = [Running(), RuntimeError("server out of reach"), RuntimeError("server out of reach"), Running(),
               Crashed(message="worker lost")]

    sent: list[str] = []

    def beat_and_read_state(line: str):
        sent.append(line)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    stop, abandon = threading.Event(), threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(logging.getLogger("test"), "cam_train", 0.05, stop, abandon,
                                                     beat_and_read_state))
    beat.start()
    beat.join(timeout=10)
    assert not beat.is_alive() and abandon.is_set() and answers == []
    stop.set()
    assert len(sent) == 5 and all(line.startswith("heartbeat: stage cam_train running for ") for line in sent)
    unreadable = [record for record in caplog.records if "cannot reach the server" in record.getMessage()]
    assert len(unreadable) == 1 and "server out of reach" in unreadable[0].getMessage()
    assert any("holds this run as Crashed (worker lost)" in record.getMessage() for record in caplog.records)


def test_sweep_rows_hold_the_varied_params_and_every_metric_of_finished_experiments_only() -> None:
    """The real params.yaml nests every key (``seg.train.lr``): the sweep table used to drop every nested param and
    metric, so it showed no param column at all, and it listed queued / failed experiments (which show the
    baseline's metrics as theirs)."""
    from flows.sweep import experiment_rows, override_columns

    def revision(rev: str, lr: float, miou: float, error: bool = False) -> dict:
        data = {"params": {"params.yaml": {"data": {"seg": {"train": {"lr": lr}, "model": "deeplabv2"}, "scale": 1}}},
                "metrics": {"metrics/seg.json": {"data": {"miou": miou, "per_class": {"cat": miou / 2}}}}}
        return {"rev": rev, "data": data, **({"error": {"msg": "failed"}} if error else {})}

    shown = [{"rev": "base", "name": "main", "experiments": [
        {"name": "lr-small", "executor": None, "revs": [revision("1234567890", 0.001, 0.6)]},
        {"name": "lr-queued", "executor": {"state": "queued"}, "revs": [revision("2", 0.1, 0.5)]},
        {"name": "lr-failed", "executor": {"state": "failed"}, "revs": [revision("3", 0.2, 0.5)]},
        {"name": "lr-error", "executor": None, "revs": [revision("4", 0.3, 0.5, error=True)]},
        {"name": "not-swept", "executor": None, "revs": [revision("5", 0.4, 0.5)]},
    ]}]
    variants = {"lr-small": ["seg.train.lr=0.001"], "lr-queued": ["seg.train.lr=0.1"], "lr-failed": ["seg.train.lr=0.2"],
                "lr-error": ["seg.train.lr=0.3", "~scale"]}
    assert override_columns(variants) == {"params.yaml:seg.train.lr"}
    assert override_columns({"x": ["other.yaml:a.b=2", "+new.key=1"]}) == {"other.yaml:a.b", "params.yaml:new.key"}
    assert experiment_rows(shown, list(variants), override_columns(variants)) == [
        {"experiment": "lr-small", "rev": "1234567", "params.yaml:seg.train.lr": 0.001,
         "metrics/seg.json:miou": 0.6, "metrics/seg.json:per_class.cat": 0.3}]


def test_a_deployments_flow_works_in_weakclip_project_and_the_clis_in_the_folder_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prefect.yaml's pull step puts a deployment's flow in the code checkout ($WEAKCLIP_REPO): the sweep
    deployment's repo_dir "." used to resolve there (it swept the code checkout's HEAD and pushed its experiments
    there), and a chain deployment on a worker without WEAKCLIP_PROJECT ran in the code checkout. The command
    lines mean the folder given, whatever WEAKCLIP_PROJECT says."""
    from flows.machines import Refused, project_clone

    project, here = tmp_path / "project", tmp_path / "code-checkout"
    project.mkdir()
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.delenv("WEAKCLIP_PROJECT", raising=False)
    monkeypatch.delenv("PREFECT__RUNTIME__DEPLOYMENT__ID", raising=False)
    assert project_clone(".") == here  # python -m flows.chain / flows.sweep here, no deployment
    monkeypatch.setenv("PREFECT__RUNTIME__DEPLOYMENT__ID", "5b7c0a52-0000-4000-8000-000000000000")
    with pytest.raises(Refused, match=f"WEAKCLIP_PROJECT is not set for this worker: .*not {here}"):
        project_clone(".")
    monkeypatch.setenv("WEAKCLIP_PROJECT", str(project))
    assert project_clone(".") == project
    assert project_clone(str(here)) == here  # a path given is the path given

    seen: dict[str, str] = {}
    monkeypatch.setattr("flows.sweep.sweep", lambda repo_dir, **_: seen.setdefault("sweep", repo_dir) and [])
    monkeypatch.setattr(sys, "argv", ["flows.sweep", "--variant", "a", "scale=0.7"])
    from flows.sweep import main as sweep_main

    sweep_main()
    assert seen["sweep"] == str(here)


def test_url_passwords_are_masked_in_what_reaches_the_server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What a command is run with and prints goes to the run's logs, and a failure's text to its state message:
    the server's database and UI. A remote URL's password is masked in all of them."""
    import logging

    from flows.dvc_cli import CommandFailed, mask_url_passwords, run_command

    code = "import sys; print('pushing to https://alice:s3cr3t@dvc.example.com/store'); sys.exit(1)"
    with caplog.at_level(logging.INFO, logger="mask-test"), pytest.raises(CommandFailed) as failed:
        run_command([sys.executable, "-c", code, "https://bob:hunter2@host/x"], tmp_path, logging.getLogger("mask-test"))
    for text in (caplog.text, str(failed.value)):
        assert "s3cr3t" not in text and "hunter2" not in text
        assert "https://alice:***@dvc.example.com/store" in text and "https://bob:***@host/x" in text

    assert mask_url_passwords("https://alice:s3cr3t-token@dvc.example.com/store") == \
        "https://alice:***@dvc.example.com/store"
    assert mask_url_passwords("failed: webdavs://u:p%40ss@h:8443/a and http://h/b") == \
        "failed: webdavs://u:***@h:8443/a and http://h/b"
    for kept in ("ssh://bob@host:22/data", "s3://bucket/path", "/mnt/nfs/remote", "https://host:8443/x"):
        assert mask_url_passwords(kept) == kept


def test_metrics_flattening_and_artifact_keys() -> None:
    metrics = {"miou": 0.5, "per_class": {"cat": 0.25, "dog": {"x": 1}}, "name": "ignored", "flag": True}
    assert flatten_metrics(metrics) == {"miou": 0.5, "per_class.cat": 0.25, "per_class.dog.x": 1.0}
    assert artifact_key("seg_train@gt", "metrics") == "seg-train-gt-metrics"


# --- slow: flows run against a local Prefect server ------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    from flows.local_server import drain_prefect_clients, local_prefect_server

    home = tmp_path_factory.mktemp("prefect_home")
    with local_prefect_server(home) as server:
        with temporary_settings({PREFECT_API_URL: server.api_url, PREFECT_SERVER_ANALYTICS_ENABLED: False}):
            yield server.api_url
            drain_prefect_clients()


@pytest.mark.slow
def test_chain_leaves_the_same_lock_as_dvc_repro(prefect_api: str, tmp_path: Path) -> None:
    from flows.chain import chain

    project = write_demo_project(tmp_path / "flow")
    report = chain(repo_dir=str(project), max_parallel=2, retry_delay_s=0.2)
    assert set(report.completed) == set(demo_stages())
    assert report.metrics["eval_a"]["metrics/eval_a.json"]["miou"] == pytest.approx(0.5 * 45 / 100)

    reference = tmp_path / "reference"
    run(["git", "clone", "--quiet", str(project), str(reference)], tmp_path)
    run([*DVC, "repro"], reference)
    assert lock_hashes(project) == lock_hashes(reference)
    assert set(lock_hashes(project)["cam_train"]) == {
        "artifacts/model.txt", "dvclive/cam_train/metrics.json", "dvclive/cam_train/plots/metrics"
    }
    # DVC, not the flow, decides staleness: a second run re-runs nothing.
    assert "Running stage" not in run([*DVC, "repro"], project)


@pytest.mark.slow
def test_failed_stage_is_retried_then_stops_its_descendants(prefect_api: str, tmp_path: Path) -> None:
    from prefect import get_client

    from flows.chain import chain

    stages = demo_stages()
    prepare = stages["prepare"]
    failing = {
        "prepare": prepare,
        "broken": {
            "cmd": "python -c \"open('attempts.log', 'a').write('try\\n'); raise SystemExit(3)\"",
            "deps": ["data/raw.txt"],
            "outs": ["broken.txt"],
        },
        "after_broken": {"cmd": "python -c \"open('after.txt', 'w').write('x')\"", "deps": ["broken.txt"], "outs": ["after.txt"]},
        "independent": {"cmd": "python -c \"open('independent.txt', 'w').write('y')\"", "deps": ["data/raw.txt"], "outs": ["independent.txt"]},
    }
    project = write_demo_project(tmp_path / "failing", stages=failing)
    state = chain(repo_dir=str(project), retries=2, retry_delay_s=0.2, return_state=True)

    assert state.is_failed()
    assert "['broken'] failed" in state.message and "not run: ['after_broken']" in state.message
    assert (project / "attempts.log").read_text().splitlines() == ["try"] * 3  # 1 run + 2 retries
    assert not (project / "after.txt").exists()
    assert (project / "independent.txt").read_text() == "y"  # a sibling branch still ran

    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    by_name = {run_.name: run_ for run_ in task_runs}
    # The stage not run is in the flow run, in a state of its own (not only a log line).
    assert by_name["after_broken"].state.name == "NotRun" and by_name["after_broken"].state.is_cancelled()
    assert "upstream stage(s) ['broken'] failed" in by_name["after_broken"].state.message
    assert by_name["broken"].state.is_failed() and by_name["broken"].run_count == 3
    assert by_name["independent"].state.is_completed()

    # The CLI's end of a failed run names the failed stage and its last error lines.
    again = write_demo_project(tmp_path / "failing-cli", stages=failing)
    cli = subprocess.run(
        [sys.executable, "-m", "flows.chain", "--repo-dir", str(again), "--retries", "0"],
        env=dict(tool_env(), PREFECT_API_URL=prefect_api), capture_output=True, text=True, timeout=300,
    )
    assert cli.returncode == 1
    last = cli.stderr[cli.stderr.rindex("chain failed:"):]
    assert last.startswith("chain failed: DVC stage(s) ['broken'] failed; not run: ['after_broken']"), cli.stderr[-3000:]
    assert "--- broken:" in last and "exited with 3" in last, last


@pytest.mark.slow
def test_a_refusal_is_not_retried_and_a_failure_is(prefect_api: str) -> None:
    """The chain's retry condition, in a real Prefect task with two retries: a refusal (``Refused`` raised in the
    task: a run past the parameter limit; ``StageRefused``: no worker polling) is tried once, any other error three
    times. Prefect hands the condition a state whose message is the exception's ``repr``; the old condition looked
    there for ``Refused:`` and so retried every ``Refused``."""
    from prefect import flow, task

    from flows.chain import StageRefused, _retry_unless_refused
    from flows.machines import Refused

    for error, tries in [(Refused("run too large"), 1), (StageRefused("no worker"), 1), (RuntimeError("exit 3"), 3)]:
        attempts: list[int] = []

        @task(retries=2, retry_condition_fn=_retry_unless_refused)
        def failing() -> None:
            attempts.append(1)
            raise error

        @flow
        def one_task() -> None:
            failing()

        assert one_task(return_state=True).is_failed()
        assert len(attempts) == tries, (error, attempts)


@pytest.mark.slow
def test_the_heartbeat_reaches_the_server_when_the_worker_logs_only_warnings(prefect_api: str) -> None:
    """A worker run with ``PREFECT_LOGGING_LEVEL=WARNING`` (the ``prefect`` logger at WARNING): its INFO lines never
    reach the server, so a heartbeat sent through the run logger left the chain hearing nothing, and every stage
    longer than ``worker_lost_after_s`` was crashed and re-run. ``send_heartbeat`` posts through the API: the
    server holds the line (and hands back the run's state), while the run logger's INFO line is dropped."""
    import logging
    import uuid

    from prefect import flow, get_client, get_run_logger
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.context import get_run_context

    from flows.chain import send_heartbeat
    from flows.local_server import drain_prefect_clients

    marker = uuid.uuid4().hex
    prefect_logger = logging.getLogger("prefect")
    level = prefect_logger.level

    @flow
    def quiet_worker() -> str:
        get_run_logger().info("through the logger %s", marker)
        return send_heartbeat(get_run_context().flow_run.id, f"heartbeat: {marker}").name

    prefect_logger.setLevel(logging.WARNING)
    try:
        state = quiet_worker(return_state=True)
    finally:
        prefect_logger.setLevel(level)
    assert state.result() == "Running"
    drain_prefect_clients()  # the log worker's queue, so a line the logger did send would be there
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    messages = [log.message for log in logs]
    assert f"heartbeat: {marker}" in messages
    assert not any("through the logger" in message for message in messages)


@pytest.mark.slow
def test_a_completed_run_is_not_overwritten_by_crashed(prefect_api: str) -> None:
    """What the chain's worker-lost check relies on, on a real server: Crashed proposed unforced over a Completed
    run is aborted and the run stays Completed; over a Cancelling run it is rejected; over a Running run accepted."""
    from prefect import flow, get_client
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Cancelling, Completed, Crashed, Running

    @flow
    def some_stage() -> None:
        pass

    with get_client(sync_client=True) as client:
        for path, status, final in [([Running(), Completed()], SetStateStatus.ABORT, "COMPLETED"),
                                    ([Running(), Cancelling()], SetStateStatus.REJECT, "CANCELLING"),
                                    ([Running()], SetStateStatus.ACCEPT, "CRASHED")]:
            flow_run = client.create_flow_run(some_stage)
            for state in path:
                client.set_flow_run_state(flow_run.id, state, force=True)
            assert client.set_flow_run_state(flow_run.id, Crashed(message="worker lost")).status == status
            assert client.read_flow_run(flow_run.id).state.type.value == final


@pytest.mark.slow
def test_remote_round_trip_reruns_nothing(prefect_api: str, tmp_path: Path) -> None:
    from flows.chain import chain

    remote_dir = tmp_path / "dvc-remote"
    machine_a = write_demo_project(tmp_path / "machine_a", remote_dir=remote_dir)
    chain(repo_dir=str(machine_a), remote="shared", retry_delay_s=0.2)
    assert any(path.is_file() for path in remote_dir.rglob("*")), "the stages pushed nothing"
    run(["git", "add", "--all"], machine_a)
    run(["git", "commit", "--quiet", "-m", "run the chain"], machine_a)

    machine_b = tmp_path / "machine_b"
    run(["git", "clone", "--quiet", str(machine_a), str(machine_b)], tmp_path)
    assert not (machine_b / "artifacts" / "model.txt").exists()
    run([*DVC, "pull"], machine_b)
    assert (machine_b / "artifacts" / "model.txt").read_text() == "45"
    output = run([*DVC, "repro"], machine_b)
    assert "Running stage" not in output
    assert lock_hashes(machine_b) == lock_hashes(machine_a)
    assert run(["git", "status", "--porcelain"], machine_b).strip() == ""


@pytest.mark.slow
def test_sweep_variants_gathered_in_one_exp_show(prefect_api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.sweep import sweep

    for key, value in tool_env().items():
        if key.startswith("GIT_"):
            monkeypatch.setenv(key, value)
    remote_dir = tmp_path / "dvc-remote"
    origin = write_demo_project(tmp_path / "origin", remote_dir=remote_dir)
    # The remote as a path relative to the project (.dvc/config: ../../dvc-remote): each variant's clone, in a
    # temporary folder, used to resolve it inside that folder, push its outputs there and lose them with it.
    run([*DVC, "remote", "modify", "shared", "url", "../dvc-remote"], origin)
    run([*DVC, "repro"], origin)
    run([*DVC, "push"], origin)
    run(["git", "add", "--all"], origin)
    run(["git", "commit", "--quiet", "-m", "baseline"], origin)
    baseline_objects = {path for path in remote_dir.rglob("*") if path.is_file()}

    rows = sweep(repo_dir=str(origin), variants={"scale-7": ["scale=0.7"], "scale-9": ["scale=0.9"]}, remote="shared")
    # Each variant's one new cached output (reports/summary.txt: its scale's eval_a miou + eval_b's) is on the remote.
    assert len({path for path in remote_dir.rglob("*") if path.is_file()} - baseline_objects) == 2
    by_name = {row["experiment"]: row for row in rows}
    assert set(by_name) == {"scale-7", "scale-9"}
    # eval_a's miou = scale * sum(range(10)) / 100, by hand: 0.315 and 0.405.
    assert by_name["scale-7"]["metrics/eval_a.json:miou"] == pytest.approx(0.315)
    assert by_name["scale-9"]["metrics/eval_a.json:miou"] == pytest.approx(0.405)
    assert by_name["scale-7"]["params.yaml:scale"] == 0.7 and by_name["scale-7"]["metrics/eval_a.json:per_class.cat"] == 0.25
    # The same name again used to run, have its push kept out ("diverged", exit 0) and report the old figures.
    with pytest.raises(ValueError, match=r"experiment\(s\) \['scale-7'\] already exist on .*dvc exp remove scale-7"):
        sweep(repo_dir=str(origin), variants={"scale-7": ["scale=0.8"]}, remote="shared")

    # Another machine gathers them with dvc exp pull and compares them in one table.
    analyst = tmp_path / "analyst"
    run(["git", "clone", "--quiet", str(origin), str(analyst)], tmp_path)
    run([*DVC, "exp", "pull", "origin", "scale-7", "scale-9"], analyst)
    shown = json.loads(subprocess.run([*DVC, "exp", "show", "--json"], cwd=analyst, env=tool_env(), capture_output=True, text=True, check=True).stdout)
    experiments = {exp["name"]: exp["revs"][0]["data"] for entry in shown for exp in entry.get("experiments") or []}
    assert experiments["scale-7"]["params"]["params.yaml"]["data"]["scale"] == 0.7
    assert experiments["scale-9"]["metrics"]["metrics/eval_a.json"]["data"]["miou"] == pytest.approx(0.405)


PARALLEL_SLEEPER = """import pathlib, sys, time
name, other = sys.argv[1:]
times = pathlib.Path("times")
times.mkdir(exist_ok=True)
start = time.time()
(times / f"{name}.started").write_text("")
# Wait (60 s at most) until the sibling has started too: on a loaded 2-core machine the two DVC processes may
# reach their commands seconds apart, and a fixed sleep made the test a race. Run one after the other, the
# first waits out the 60 s and ends before the second starts: no overlap, and the test fails as it should.
while not (times / f"{other}.started").exists() and time.time() < start + 60:
    time.sleep(0.05)
time.sleep(0.5)
(times / f"{name}.txt").write_text(f"{start} {time.time()}")
pathlib.Path(f"{name}.out").write_text(pathlib.Path("data/raw.txt").read_text())
"""
"""A sibling stage's command for the overlap test: it records when it ran, after both siblings had started."""


@pytest.mark.slow
def test_independent_branches_run_at_the_same_time(prefect_api: str, tmp_path: Path) -> None:
    """DVC locks only its bookkeeping: two sibling stages' commands overlap in time, and both land in dvc.lock."""
    from flows.chain import chain

    def sleeper(name: str, other: str) -> dict[str, object]:
        return {"cmd": f"python sleeper.py {name} {other}", "deps": ["data/raw.txt"], "outs": [f"{name}.out"]}

    stages = {"prepare": demo_stages()["prepare"], "left": sleeper("left", "right"), "right": sleeper("right", "left")}
    project = write_demo_project(tmp_path / "parallel", stages=stages)
    (project / ".gitignore").write_text("/env/\n/times/\n/sleeper.py\n")
    (project / "sleeper.py").write_text(PARALLEL_SLEEPER)
    chain(repo_dir=str(project), max_parallel=2, retry_delay_s=0.2)
    left_start, left_end = map(float, (project / "times" / "left.txt").read_text().split())
    right_start, right_end = map(float, (project / "times" / "right.txt").read_text().split())
    assert left_start < right_end and right_start < left_end, "the two branches did not overlap"
    assert set(lock_hashes(project)) == {"prepare", "left", "right"}
    assert "Running stage" not in run([*DVC, "repro"], project)

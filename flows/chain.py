"""The ``chain`` flow: run the DVC pipeline stage by stage as Prefect tasks.

The DAG comes from DVC (``flows.dag.read_stage_graph``); each stage is one task
that runs ``dvc repro --single-item <stage>``, so DVC decides what is stale and
owns ``dvc.lock``. Independent stages run at the same time (DVC takes its repo
lock only around its bookkeeping, not around a stage's command — measured with
two 4 s stages finishing together in 5 s); a stage starts only when all its
upstream stages completed. A failed stage (after its retries) stops its
descendants and the flow fails with a message that names it.

``dispatch="local"`` runs the stages inside this flow run; ``dispatch="pools"``
sends each stage to the ``stage`` deployment of its work pool (GPU stages to the
GPU pool, pinned to one GPU each by the deployment's job variables). With pools,
this flow is the *coordinator* (flows/machines.py): each stage run carries the
clone's commit, params and dvc.lock; the worker (its own clone and DVC cache)
returns the stage's lock entry, which is merged here; at the end the workspace
is pulled complete and ``dvc status`` must be clean.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.settings import get_current_settings
from prefect.states import Cancelled, Crashed

from flows.dag import StageGraph, StageSpec, read_stage_graph
from flows.dvc_cli import CommandFailed, capture_command, dvc_command, run_command
from flows.machines import (
    Refused,
    RunState,
    apply_param_overrides,
    capture_run_state,
    carried_inputs,
    chain_lock,
    check_external_deps_here,
    check_run_size,
    git,
    merge_lock_entry,
    outside_repository,
    params_changed_since_commit,
    params_files,
    project_clone,
    run_stage_on_worker,
    worker_clone,
    write_files,
)
from flows.resources import (
    CPU_POOL,
    CPU_STAGE_QUEUE,
    GPU_POOL,
    STAGE_FLOW_NAME,
    Placement,
    gpu_queue,
    gpu_stage_deployment,
    place_stages,
)
from flows.stage_run import execute_stage, publish_stage_metrics

Dispatch = Literal["local", "pools"]
RESULT_ARTIFACT_TYPE = "weakclip-stage-result"
_LOCK_GUARD = threading.Lock()  # the coordinator's dvc.lock: one merge at a time
LAST_LINES = 8


class StageFailed(RuntimeError):
    """Raised by the flow when stages failed; names them, their last error lines, and the stages not run."""

    def __init__(self, failed: dict[str, str], not_run: list[str]) -> None:
        self.failed = failed
        self.not_run = not_run
        details = "\n".join(f"--- {name}: {last_lines(reason)}" for name, reason in sorted(failed.items()))
        super().__init__(f"DVC stage(s) {sorted(failed)} failed; not run: {sorted(not_run)}\n{details}")


class StageRefused(RuntimeError):
    """A stage run that retrying cannot fix (no worker polls its pool, the worker refused the run state)."""


def last_lines(text: str, count: int = LAST_LINES) -> str:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return "\n".join(lines[-count:])


@dataclass(frozen=True)
class ChainReport:
    """What one chain run did: stages completed (in completion order) and their metrics."""

    completed: tuple[str, ...]
    metrics: dict[str, dict[str, dict[str, float]]]


HEARTBEAT_S = 10.0
"""How often a stage's flow run says it is alive, when ``worker_lost_after_s`` leaves room (see PoolSettings)."""

HEARTBEATS_PER_LOST_WINDOW = 4
"""A worker is taken for lost only after this many of its heartbeats in a row went missing: one late heartbeat (a
loaded machine, a slow request) must not crash a healthy stage."""


@dataclass(frozen=True)
class PoolSettings:
    """How the coordinator waits on a stage's flow run (seconds)."""

    start_timeout_s: float = 300.0  # no worker took the run by then: is any worker polling its queue?
    worker_lost_after_s: float = 120.0  # a started stage run silent (no log, no heartbeat) that long: its worker died
    stage_timeout_s: float = 7 * 24 * 3600.0
    worker_repo_dir: str = "."  # "." : each worker's own clone ($WEAKCLIP_PROJECT or its working folder)

    def __post_init__(self) -> None:
        if self.worker_lost_after_s <= 0 or self.start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s and worker_lost_after_s must be positive, got {self.start_timeout_s} "
                             f"and {self.worker_lost_after_s}")

    @property
    def heartbeat_s(self) -> float:
        """At most ``worker_lost_after_s / HEARTBEATS_PER_LOST_WINDOW`` apart (``HEARTBEAT_S`` by default): at a
        fixed 10 s a ``worker_lost_after_s`` of 15 crashed every stage whose heartbeat came 5 s late."""
        return min(HEARTBEAT_S, self.worker_lost_after_s / HEARTBEATS_PER_LOST_WINDOW)


@task(task_run_name="{stage.name}")
def run_stage_here(stage: StageSpec, repo_dir: str, remote: str | None) -> dict[str, dict[str, float]]:
    """Run one stage in this flow run's process (its output goes to this task run's logs)."""
    return execute_stage(stage, Path(repo_dir), get_run_logger(), remote=remote)


@task(task_run_name="{name}")
def stage_not_run(name: str, reason: str) -> Any:
    """A stage that was not run (an upstream stage failed): a task run in state ``NotRun`` in the flow run."""
    get_run_logger().warning("stage %s not run: %s", name, reason)
    return Cancelled(name="NotRun", message=f"not run: {reason}")


class SilenceClock:
    """How long a worker's latest sign of life has not moved, timed by this process's monotonic clock.

    The timestamps are the worker's (its log records) and the worker's clock may differ from the coordinator's:
    measured as "now minus the timestamp", a worker two minutes behind looked lost while it logged every 10 s,
    and its stage was crashed and re-run. Only whether the timestamp moves is read here, never its value.
    """

    def __init__(self) -> None:
        self.latest: _dt.datetime | None = None
        self.moved_at = time.monotonic()

    def silent_s(self, latest: _dt.datetime | None) -> float:
        """Seconds since ``latest`` last changed (since this clock was made, if it never has)."""
        now = time.monotonic()
        if latest is not None and latest != self.latest:
            self.latest, self.moved_at = latest, now
        return now - self.moved_at


def _last_sign_of_life(client: Any, flow_run: Any) -> _dt.datetime | None:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    moments = [flow_run.state.timestamp] if flow_run.state is not None else []
    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])), limit=1, sort=LogSort.TIMESTAMP_DESC)
    moments += [log.timestamp for log in logs]
    return max(moments) if moments else None


def _server_unreachable(error: BaseException) -> bool:
    """Whether ``error`` says the Prefect server is out of reach for now (a restart, a network cut, a 5xx), not
    that the request was wrong: the stage's run goes on meanwhile, so the chain waits rather than failing its task
    (whose retry would send the stage again beside the run still going)."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    if isinstance(error, httpx.TransportError):
        return True
    return isinstance(error, PrefectHTTPStatusError) and error.response.status_code >= 500


def wait_for_stage_run(stage_name: str, placement: Placement, flow_run_id: Any, settings: PoolSettings) -> Any:
    """Poll the stage's flow run to its end (bounded); fail clearly if no worker takes it or its worker dies.

    Every silence is timed by this process's monotonic clock from when a value last moved, never by comparing
    another machine's timestamps with this one's clock: the worker's newest log line (its heartbeat) for a run
    under way, the queue's ``last_polled`` (the server's clock) for a run no worker has taken. The server out of
    reach is waited out (up to ``stage_timeout_s``); the worker could not report meanwhile either, so both
    silences start again when it is back."""
    from prefect import get_client
    from prefect.client.schemas.responses import SetStateStatus

    logger = get_run_logger()
    started = time.monotonic()
    last_note = started
    silence, polling = SilenceClock(), SilenceClock()
    outage_since: float | None = None
    while True:
        try:
            with get_client(sync_client=True) as client:
                while True:
                    flow_run = client.read_flow_run(flow_run_id)
                    if outage_since is not None:
                        logger.info("stage %s: the Prefect server answers again after %.0f s", stage_name,
                                    time.monotonic() - outage_since)
                        outage_since = None
                        silence, polling = SilenceClock(), SilenceClock()
                    state = flow_run.state
                    if state is not None and state.is_final():
                        return flow_run
                    elapsed = time.monotonic() - started
                    if elapsed > settings.stage_timeout_s:
                        client.set_flow_run_state(flow_run_id, Cancelled(message="stage timeout"), force=True)
                        raise TimeoutError(f"stage {stage_name!r} on pool {placement.pool} ran past "
                                           f"{settings.stage_timeout_s:.0f} s")
                    if state is None or state.is_scheduled():
                        queue = client.read_work_queue_by_name(placement.queue, work_pool_name=placement.pool)
                        unpolled_s = polling.silent_s(queue.last_polled)
                        refusal = None
                        if elapsed > settings.start_timeout_s and (
                                queue.is_paused or client.read_work_pool(placement.pool).is_paused):
                            # Paused since the chain began (a redeploy with fewer GPUs, the UI's pause): its
                            # workers still poll, so only this says why nothing starts; else 7 days of "busy".
                            refusal = (f"queue {placement.queue!r} of pool {placement.pool!r} is paused (or its pool "
                                       f"is): no worker gets its runs; resume it (prefect work-queue resume "
                                       f"{placement.queue} --pool {placement.pool}; prefect work-pool resume "
                                       f"{placement.pool})")
                        elif elapsed > settings.start_timeout_s and unpolled_s > settings.worker_lost_after_s:
                            refusal = (f"no worker picked it up within {settings.start_timeout_s:.0f} s: no worker is "
                                       f"polling pool {placement.pool!r} (queue {placement.queue!r}); start one: "
                                       f"prefect worker start --pool {placement.pool} --work-queue {placement.queue}")
                        if refusal is not None:
                            message = f"stage {stage_name!r}: {refusal}"
                            client.set_flow_run_state(flow_run_id, Cancelled(message=message), force=True)
                            raise StageRefused(message)
                        if elapsed > settings.start_timeout_s and time.monotonic() - last_note > 60:
                            last_note = time.monotonic()
                            logger.info("stage %s waits in queue %s of pool %s (busy)", stage_name, placement.queue,
                                        placement.pool)
                    else:
                        silent_s = silence.silent_s(_last_sign_of_life(client, flow_run))
                        if silent_s > settings.worker_lost_after_s:
                            message = (
                                f"stage {stage_name!r}: its worker on pool {placement.pool!r} (queue {placement.queue!r}) "
                                f"stopped reporting {silent_s:.0f} s ago (no log, no heartbeat): worker lost"
                            )
                            # Not forced: a run that completed since it was read keeps its state (the server
                            # aborts Completed -> Crashed), and the next poll returns it as completed.
                            result = client.set_flow_run_state(flow_run_id, Crashed(message=message))
                            if result.status == SetStateStatus.ACCEPT:
                                raise RuntimeError(message)
                            if result.status == SetStateStatus.ABORT:
                                pass  # it ended meanwhile: the next poll returns it
                            elif state.is_cancelling():  # rejected: Prefect ends a Cancelling run (cancelled by
                                # hand, its worker gone) only as Cancelled, which the chain reports, unretried
                                client.set_flow_run_state(
                                    flow_run_id, Cancelled(message=f"{message} (it was being cancelled)"), force=True)
                            else:  # any other rejection: crashed, as before
                                client.set_flow_run_state(flow_run_id, Crashed(message=message), force=True)
                                raise RuntimeError(message)
                    time.sleep(1.0)
        except Exception as error:
            if not _server_unreachable(error):
                raise
            if outage_since is None:
                outage_since = time.monotonic()
                logger.warning("stage %s: the Prefect server is out of reach (%s: %s); waiting for it (the stage's "
                               "run goes on on its worker)", stage_name, type(error).__name__, error)
            if time.monotonic() - started > settings.stage_timeout_s:
                raise TimeoutError(f"stage {stage_name!r} on pool {placement.pool} ran past "
                                   f"{settings.stage_timeout_s:.0f} s (the Prefect server out of reach for the last "
                                   f"{time.monotonic() - outage_since:.0f} s)") from error
            time.sleep(1.0)


def _stage_result(stage_name: str, flow_run_id: Any, settings: PoolSettings) -> dict[str, Any]:
    """The completed stage run's result artifact. The server out of reach is waited out as in
    ``wait_for_stage_run``: failing here would have the task's retry run the finished stage again."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterType

    started = time.monotonic()
    while True:
        try:
            with get_client(sync_client=True) as client:
                artifacts = client.read_artifacts(
                    artifact_filter=ArtifactFilter(
                        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                        type=ArtifactFilterType(any_=[RESULT_ARTIFACT_TYPE])
                    )
                )
            break
        except Exception as error:
            if not _server_unreachable(error) or time.monotonic() - started > settings.stage_timeout_s:
                raise
            time.sleep(1.0)
    if not artifacts:
        raise RuntimeError(f"stage {stage_name!r}: its flow run {flow_run_id} completed without its result (artifact "
                           f"{RESULT_ARTIFACT_TYPE})")
    return artifacts[0].data


@task(task_run_name="{stage.name} → {placement.deployment}")
def run_stage_on_pool(
    stage: StageSpec,
    placement: Placement,
    graph: StageGraph,
    coordinator_dir: str,
    base_state: dict[str, Any],
    remote: str | None,
    settings: PoolSettings,
) -> dict[str, dict[str, float]]:
    """Send the stage, with the coordinator's run state, to its pool; merge the returned lock entry here."""
    from prefect.deployments import run_deployment

    root = Path(coordinator_dir)
    with _LOCK_GUARD:
        lock_text = (root / "dvc.lock").read_text() if (root / "dvc.lock").is_file() else None
    state = RunState(**{**base_state, "lock": lock_text, "files": carried_inputs(stage, graph, root)})
    parameters = {
        "repo_dir": settings.worker_repo_dir,
        "stage_name": stage.name,
        "remote": remote,
        "run_state": state.to_json(),
        "heartbeat_s": settings.heartbeat_s,
    }
    check_run_size(stage.name, parameters, get_current_settings().server.api.max_parameter_size)
    flow_run = run_deployment(name=placement.deployment, parameters=parameters, timeout=0, poll_interval=1)
    flow_run = wait_for_stage_run(stage.name, placement, flow_run.id, settings)
    if not flow_run.state.is_completed():
        message = flow_run.state.message or ""
        # A refusal (dirty clone, unknown commit) or a run cancelled by hand: retrying would not help.
        kind = StageRefused if "Refused:" in message or flow_run.state.is_cancelled() else RuntimeError
        raise kind(f"stage {stage.name!r} on {placement.pool} ({placement.deployment}) ended {flow_run.state.name}: {message}")
    result = _stage_result(stage.name, flow_run.id, settings)
    write_files(root, result["files"], replaced=stage.uncached)  # the worker returns all of each, as its run left it
    merge_lock_entry(root, stage.name, result["entry"], _LOCK_GUARD)
    return result["metrics"]


def _retry_unless_refused(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's ``retry_condition_fn``: a refusal (dirty clone, a run past the parameter limit, no worker polling)
    ends the same way on every try, so it is not retried. Prefect hands over a ``Failed`` state whose ``data`` is
    the exception raised (its message is the exception's ``repr``, which holds no ``Refused:``)."""
    return not isinstance(state.data, (Refused, StageRefused))
def _miou_markdown(metrics_by_stage: dict[str, dict[str, dict[str, float]]]) -> str:
    """A markdown table of every mIoU-like metric (key ending in ``miou``) per stage."""
    lines = ["| stage | metric | value |", "|---|---|---|"]
    for stage_name, metrics_by_file in metrics_by_stage.items():
        for path, metrics in metrics_by_file.items():
            for name, value in sorted(metrics.items()):
                if name.lower().endswith("miou"):
                    lines.append(f"| {stage_name} | {path}: {name} | {value:.4f} |")
    if len(lines) == 2:
        lines.append("| (no stage wrote an mIoU) | | |")
    return "\n".join(lines)


def _submit(
    stage: StageSpec,
    graph: StageGraph,
    repo_dir: str,
    dispatch: Dispatch,
    placements: dict[str, Placement],
    base_state: dict[str, Any] | None,
    remote: str | None,
    retries: int,
    retry_delay_s: float,
    settings: PoolSettings,
) -> PrefectFuture:
    options = {"retries": retries, "retry_delay_seconds": retry_delay_s, "retry_jitter_factor": 0.5}
    if dispatch == "local":
        return run_stage_here.with_options(**options).submit(stage, repo_dir, remote)
    return run_stage_on_pool.with_options(**options, retry_condition_fn=_retry_unless_refused).submit(
        stage, placements[stage.name], graph, repo_dir, base_state, remote, settings
    )


def schedule_stages(
    graph: StageGraph,
    repo_dir: str,
    dispatch: Dispatch,
    gpu_count: int,
    remote: str | None,
    max_parallel: int,
    retries: int,
    retry_delay_s: float,
    base_state: dict[str, Any] | None = None,
    settings: PoolSettings | None = None,
) -> ChainReport:
    """Submit each stage once its upstream stages completed, at most ``max_parallel`` at a time.

    A stage whose upstream failed (or was itself not run) is never run: it gets a task run in state ``NotRun``.
    """
    logger = get_run_logger()
    settings = settings or PoolSettings()
    by_name = graph.by_name()
    placements = place_stages(graph.names(), gpu_count)
    waiting = graph.names()
    running: dict[PrefectFuture, str] = {}
    completed: list[str] = []
    failed: dict[str, str] = {}
    not_run: list[str] = []
    not_run_futures: list[PrefectFuture] = []
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    while waiting or running:
        waiting_before = len(waiting)
        for name in list(waiting):
            upstream = by_name[name].upstream
            blocked = [parent for parent in upstream if parent in failed or parent in not_run]
            if blocked:
                waiting.remove(name)
                not_run.append(name)
                not_run_futures.append(stage_not_run.submit(name, f"upstream stage(s) {blocked} failed or were not run"))
            elif all(parent in completed for parent in upstream) and len(running) < max_parallel:
                waiting.remove(name)
                future = _submit(
                    by_name[name], graph, repo_dir, dispatch, placements, base_state, remote, retries, retry_delay_s, settings
                )
                running[future] = name
        if not running:
            if waiting and len(waiting) == waiting_before:
                raise RuntimeError(f"stages {waiting} wait on upstream stages that are not in the graph")
            continue
        finished = next(as_completed(list(running)))
        name = running.pop(finished)
        finished.wait()  # sets the future's final state (``.state`` alone may still read "Running" from the API)
        state = finished.state
        if state.is_completed():
            completed.append(name)
            metrics[name] = finished.result()
        else:
            failed[name] = state.message or state.name
            logger.error("stage %s failed: %s", name, failed[name])
    for future in not_run_futures:
        future.wait()
    if failed:
        raise StageFailed(failed, not_run)
    return ChainReport(completed=tuple(completed), metrics=metrics)


def deployed_gpu_count() -> int:
    """How many GPUs the user deployed: the ``stage/stage-gpu-<i>`` deployments, i = 0, 1, ... in a row."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        deployments = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[STAGE_FLOW_NAME])))
    names = {deployment.name for deployment in deployments}
    count = 0
    while gpu_stage_deployment(count) in names:
        count += 1
    return count


def check_gpu_queues(gpu_count: int) -> None:
    """Each GPU queue must hold at most one stage at a time (concurrency limit 1, set by ``python -m flows.deploy``),
    and no pool or queue a stage is sent to may be paused: the server hands out none of its runs, so the stage would
    wait in it until ``stage_timeout_s`` (its workers still poll, so it never looks unattended)."""
    from prefect import get_client

    deploy_hint = f"run python -m flows.deploy --gpus {gpu_count}"
    with get_client(sync_client=True) as client:
        for pool in (CPU_POOL, GPU_POOL) if gpu_count else (CPU_POOL,):
            try:
                paused = client.read_work_pool(pool).is_paused
            except Exception as error:  # noqa: BLE001 - ObjectNotFound and friends
                raise Refused(f"work pool {pool!r} is missing ({type(error).__name__}): {deploy_hint}") from error
            if paused:
                raise Refused(f"work pool {pool!r} is paused: no stage sent to it would start (prefect work-pool resume "
                              f"{pool})")
        queues = [(CPU_POOL, CPU_STAGE_QUEUE)] + [(GPU_POOL, gpu_queue(index)) for index in range(gpu_count)]
        for pool, name in queues:
            try:
                queue = client.read_work_queue_by_name(name, work_pool_name=pool)
            except Exception as error:  # noqa: BLE001 - ObjectNotFound and friends
                raise Refused(f"queue {name!r} of pool {pool!r} is missing ({type(error).__name__}): {deploy_hint}") from error
            if queue.is_paused:
                raise Refused(f"queue {name!r} of pool {pool!r} is paused: no stage sent to it would start (python -m "
                              f"flows.deploy --gpus {gpu_count} resumes it)")
            if pool == GPU_POOL and queue.concurrency_limit != 1:
                raise Refused(
                    f"queue {name!r} of pool {pool!r} has concurrency limit {queue.concurrency_limit} "
                    f"(two stages could share GPU {name.removeprefix('gpu-')}): {deploy_hint}"
                )


def finish_coordinator(root: Path, graph: StageGraph, remote: str | None, commit: bool, params: list[str], title: str) -> str:
    """Pull every output of the chain's stages here, require a clean ``dvc status``, optionally commit the lock."""
    logger = get_run_logger()
    remote_args = ["--remote", remote] if remote else []
    run_command(dvc_command("pull", "--force", *remote_args, *graph.names()), root, logger)
    status = capture_command(dvc_command("status", "--json", *graph.names()), root).strip()
    if status not in ("{}", ""):
        changed_outside = sorted({path for entries in json.loads(status).values() for entry in entries
                                  if isinstance(entry, dict) for path in entry.get("changed deps", {})
                                  if outside_repository(path)})
        hint = (f" (the workers' copy of {', '.join(changed_outside[:3])} differs from the coordinator's: every "
                "machine needs the same external inputs at the same paths)" if changed_outside else "")
        raise RuntimeError(f"{root}: dvc status is not clean after the chain: {status[:2000]}{hint}")
    if not commit:
        return ""
    paths = ["dvc.lock", *params, *[out for stage in graph.stages for out in stage.uncached if (root / out).exists()]]
    git(["add", "--", *paths], root)
    if not git(["status", "--porcelain", "--untracked-files=no"], root).strip():
        return git(["rev-parse", "HEAD"], root).strip()
    git(["commit", "--quiet", "-m", title], root)
    sha = git(["rev-parse", "HEAD"], root).strip()
    logger.info("committed dvc.lock as %s", sha[:12])
    return sha


@flow(name="chain", log_prints=True)
def chain(
    repo_dir: str = ".",
    targets: list[str] | None = None,
    dispatch: Dispatch = "local",
    gpu_count: int | None = None,
    remote: str | None = None,
    max_parallel: int = 2,
    retries: int = 2,
    retry_delay_s: float = 2.0,
    commit: bool = False,
    start_timeout_s: float = 300.0,
    worker_lost_after_s: float = 120.0,
    worker_repo_dir: str = ".",
    set_params: list[str] | None = None,
) -> ChainReport:
    """Run the DVC pipeline at ``repo_dir`` (or only what ``targets`` need) stage by stage.

    ``remote``: a DVC remote name (else DVC's default remote); with ``dispatch="pools"``
    each stage runs on a worker's own clone against this clone's commit, params and
    dvc.lock, and its lock entry is merged here. ``set_params``: ``dvc exp run -S``-style
    ``[file:]key=value`` overrides written into this clone's params files first (they travel). ``gpu_count``: ``None`` = the GPUs
    deployed (``stage/stage-gpu-<i>``). ``commit``: git-commit the resulting dvc.lock
    (and params, cache: false outputs) here at the end (pools only).
    """
    if max_parallel < 1:
        raise ValueError(f"max_parallel must be at least 1, got {max_parallel}")
    if commit and dispatch != "pools":
        raise ValueError("commit=True commits the coordinator's dvc.lock after a pools run: it needs dispatch='pools'")
    root = project_clone(repo_dir)
    logger = get_run_logger()
    with chain_lock(root):
        if set_params:
            apply_param_overrides(root, set_params)
            logger.info("params set here (uncommitted; they travel with every stage run): %s", ", ".join(set_params))
        graph = read_stage_graph(root)
        changed = params_changed_since_commit(root, params_files(graph))
        if changed and not set_params:  # e.g. an earlier chain's -S overrides, left in this clone's params files
            logger.warning("this clone's params differ from its commit and travel with every stage run (an earlier "
                           "chain's -S overrides stay until committed or reverted): %s", "; ".join(changed))
        if targets:
            graph = graph.select(targets)
        logger.info("stages in order: %s", ", ".join(graph.names()))
        base_state: dict[str, Any] | None = None
        settings = PoolSettings(
            start_timeout_s=start_timeout_s, worker_lost_after_s=worker_lost_after_s, worker_repo_dir=worker_repo_dir
        )
        if dispatch == "pools":
            if gpu_count is None:
                gpu_count = deployed_gpu_count()
            check_gpu_queues(gpu_count)
            run_state = capture_run_state(root, graph)
            check_external_deps_here(root, graph)
            base_state = {k: v for k, v in run_state.to_json().items() if k not in ("lock", "files")}
            logger.info("coordinator %s at commit %s, %d GPU queue(s)", root, run_state.commit[:12], gpu_count)
        report = schedule_stages(
            graph, str(root), dispatch, gpu_count or 0, remote, max_parallel, retries, retry_delay_s, base_state, settings
        )
        create_markdown_artifact(
            markdown="# mIoU per stage\n\n" + _miou_markdown(report.metrics),
            key="chain-miou",
            description=f"mIoU of each stage of {root}",
        )
        if dispatch == "pools":
            assert base_state is not None
            finish_coordinator(
                root, graph, remote, commit, sorted(base_state["params"]),
                f"chain: dvc.lock of {', '.join(graph.names())} at {base_state['commit'][:12]}",
            )
    return report


def send_heartbeat(flow_run_id: Any, message: str) -> Any:
    """Post ``message`` as an INFO log line of flow run ``flow_run_id`` straight through the API, and return the
    run's state as the server holds it. The chain's worker-lost check reads this run's newest log line; sent
    through the logging module instead, ``PREFECT_LOGGING_LEVEL=WARNING`` (or ``PREFECT_LOGGING_TO_API_ENABLED=
    false``) on the worker silenced it, and every stage longer than ``worker_lost_after_s`` was crashed and re-run."""
    from prefect import get_client
    from prefect.client.schemas.actions import LogCreate

    with get_client(sync_client=True) as client:
        client.create_logs([LogCreate(name="weakclip.heartbeat", level=logging.INFO, message=message,
                                      timestamp=_dt.datetime.now(_dt.timezone.utc), flow_run_id=flow_run_id)])
        return client.read_flow_run(flow_run_id).state


def _heartbeat(logger: Any, stage_name: str, every_s: float, stop: threading.Event, abandon: threading.Event,
               beat: Callable[[str], Any]) -> None:
    """Send a line every ``every_s`` (the chain's sign of life) and set ``abandon`` once the server holds this
    run in a final state: the chain gave it up (it heard nothing for ``worker_lost_after_s``, a network cut, and
    marked it Crashed to send a retry elsewhere) or someone cancelled it. The worker then stops the stage instead
    of running it twice beside the retry. ``beat(line)``: sends the line and returns the run's state from the
    server (``send_heartbeat``; an error: unknown, tried again at the next beat)."""
    started = time.monotonic()
    unreadable = False  # the last beat failed: say so once per outage, not once a beat
    while not stop.wait(every_s):
        try:
            state = beat(f"heartbeat: stage {stage_name} running for {time.monotonic() - started:.0f} s")
        except Exception as error:  # noqa: BLE001 - the server out of reach is what the chain's silence check is for
            if not unreadable:
                unreadable = True
                logger.warning("stage %s: cannot reach the server for this run's heartbeat and state (%s: %s); a run "
                               "the chain gives up meanwhile is noticed once it can", stage_name, type(error).__name__,
                               error)
            continue
        unreadable = False
        if state is not None and state.is_final():
            logger.error("stage %s: the server holds this run as %s (%s): stopping it", stage_name, state.name,
                         state.message or "no message")
            abandon.set()
            return


@flow(name="stage", log_prints=True)
def stage(
    repo_dir: str = ".",
    stage_name: str = "",
    remote: str | None = None,
    run_state: dict[str, Any] | None = None,
    heartbeat_s: float = HEARTBEAT_S,
) -> dict[str, dict[str, float]]:
    """Run one DVC stage (the flow a work pool's worker runs for ``chain(dispatch="pools")``).

    With ``run_state`` (what the chain sends): in this worker's own clone, at the coordinator's commit,
    params and dvc.lock (flows/machines.py); the result goes back as an artifact. Without: in
    ``repo_dir`` as it is.
    """
    from prefect import get_client
    from prefect.client.schemas.actions import ArtifactCreate
    from prefect.context import get_run_context

    logger = get_run_logger()
    root = worker_clone(repo_dir)
    if run_state is None:
        spec = read_stage_graph(root).by_name().get(stage_name)
        if spec is None:
            raise KeyError(f"{root / 'dvc.yaml'}: no stage named {stage_name!r}")
        return execute_stage(spec, root, logger, remote=remote)
    if repo_dir in ("", ".") and not os.environ.get("WEAKCLIP_PROJECT"):
        raise Refused(
            f"WEAKCLIP_PROJECT is not set for this worker: set it to the worker's own clone of the DVC project "
            f"(the worker checks the coordinator's commit out there; not {root})"
        )
    flow_run_id = get_run_context().flow_run.id
    stop, abandon = threading.Event(), threading.Event()
    beat = threading.Thread(target=_heartbeat, daemon=True, args=(
        logger, stage_name, heartbeat_s, stop, abandon, lambda line: send_heartbeat(flow_run_id, line)))
    beat.start()
    try:
        result = run_stage_on_worker(stage_name, RunState.from_json(run_state), root, remote, logger, abandon=abandon)
    except CommandFailed as error:
        if abandon.is_set():
            raise RuntimeError(f"stage {stage_name!r}: stopped because the chain gave this run up (the server held "
                               f"it as final: see the log above); the chain's retry runs it instead") from error
        raise
    finally:
        stop.set()
    publish_stage_metrics(StageSpec(stage_name, "", (), (), (), ()), result["metrics"])
    with get_client(sync_client=True) as client:
        client.create_artifact(
            ArtifactCreate(
                type=RESULT_ARTIFACT_TYPE,
                data=result,
                description=f"dvc.lock entry and cache: false outputs of stage `{stage_name}` (read by the chain)",
                flow_run_id=flow_run_id,
            )
        )
    return result["metrics"]


def _failure_text(state: Any) -> str:
    message = state.message or state.name
    match = re.search(r"DVC stage\(s\).*", message, re.S)
    return match.group(0) if match else message


def main(argv: list[str] | None = None) -> int:
    """``python -m flows.chain``: run the chain here (stages as local tasks, or ``--dispatch pools``), or start
    the ``chain`` deployment (``--deployment chain/chain``) and wait; a failed run ends with the failed stage
    and its last lines."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Run the DVC pipeline as a Prefect flow, stage by stage.")
    parser.add_argument("--repo-dir", default=".", help="root of the DVC project (default: .)")
    parser.add_argument("--target", action="append", default=None, help="run only what this stage needs (repeatable)")
    parser.add_argument("--remote", default=None, help="DVC remote the stages pull from and push to")
    parser.add_argument("--dispatch", choices=["local", "pools"], default="local", help="local tasks, or the work pools")
    parser.add_argument("--gpu-count", type=int, default=None, help="GPU queues to use (default: as deployed)")
    parser.add_argument("--commit", action="store_true", help="git-commit the resulting dvc.lock (pools)")
    parser.add_argument("--max-parallel", type=int, default=2, help="stages running at once (default: 2)")
    parser.add_argument("--retries", type=int, default=2, help="retries of a failed stage (default: 2)")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="s a stage may wait for a worker (pools)")
    parser.add_argument("-S", "--set-param", action="append", default=None, metavar="[FILE:]KEY=VALUE",
                        help="like dvc exp run -S: set a param in this clone first (it travels to the workers)")
    parser.add_argument("--deployment", default=None, help="start this chain deployment (e.g. chain/chain) and wait")
    args = parser.parse_args(argv)
    if args.max_parallel < 1:
        parser.error(f"--max-parallel must be at least 1, got {args.max_parallel}")
    if args.commit and not args.deployment and args.dispatch != "pools":
        parser.error("--commit commits the coordinator's dvc.lock after a pools run: add --dispatch pools "
                     "(after a local run, commit dvc.lock yourself)")
    if args.deployment:
        from prefect.deployments import run_deployment

        given = [option for option, value, default in (("--repo-dir", args.repo_dir, "."),
                                                         ("--dispatch", args.dispatch, "local")) if value != default]
        if given:  # the deployment fixes them (prefect.yaml: its worker's WEAKCLIP_PROJECT, the pools)
            parser.error(f"{' and '.join(given)} cannot be given with --deployment: the deployment runs in its "
                         "worker's WEAKCLIP_PROJECT clone and dispatches to the pools (prefect.yaml)")
        parameters: dict[str, Any] = {"max_parallel": args.max_parallel, "retries": args.retries, "commit": args.commit,
                                      "start_timeout_s": args.start_timeout}
        for key, value in (("remote", args.remote), ("targets", args.target), ("gpu_count", args.gpu_count),
                           ("set_params", args.set_param)):
            if value is not None:
                parameters[key] = value
        flow_run = run_deployment(args.deployment, parameters=parameters, poll_interval=2, as_subflow=False)
        state = flow_run.state
        print(f"flow run {flow_run.name!r} ({flow_run.id}) ended {state.name if state else 'unknown'}")
    else:
        state = chain(
            repo_dir=str(Path(args.repo_dir).resolve()),  # the folder given (default: here), not $WEAKCLIP_PROJECT
            targets=args.target,
            dispatch=args.dispatch,
            gpu_count=args.gpu_count,
            remote=args.remote,
            max_parallel=args.max_parallel,
            retries=args.retries,
            commit=args.commit,
            start_timeout_s=args.start_timeout,
            set_params=args.set_param,
            return_state=True,
        )
    if state is None or not state.is_completed():
        print(f"chain failed: {_failure_text(state) if state else 'no state'}", file=sys.stderr)
        return 1
    if not args.deployment:
        print(f"completed: {', '.join(state.result().completed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

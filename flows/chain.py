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
GPU pool, pinned to one GPU each by the deployment's job variables).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectFuture, as_completed

from flows.dag import StageGraph, StageSpec, read_stage_graph
from flows.resources import Placement, place_stages
from flows.stage_run import execute_stage, read_stage_metrics

Dispatch = Literal["local", "pools"]


class StageFailed(RuntimeError):
    """Raised by the flow when stages failed; names them and the descendants that were not run."""

    def __init__(self, failed: dict[str, str], not_run: list[str]) -> None:
        self.failed = failed
        self.not_run = not_run
        reasons = "; ".join(f"{name}: {reason}" for name, reason in failed.items())
        super().__init__(f"DVC stage(s) {sorted(failed)} failed ({reasons}); not run: {sorted(not_run)}")


@dataclass(frozen=True)
class ChainReport:
    """What one chain run did: stages completed (in completion order) and their metrics."""

    completed: tuple[str, ...]
    metrics: dict[str, dict[str, dict[str, float]]]


@task(task_run_name="{stage.name}")
def run_stage_here(stage: StageSpec, repo_dir: str, remote: str | None) -> dict[str, dict[str, float]]:
    """Run one stage in this flow run's process (its output goes to this task run's logs)."""
    return execute_stage(stage, Path(repo_dir), get_run_logger(), remote=remote)


@task(task_run_name="{stage.name} → {placement.deployment}")
def run_stage_on_pool(
    stage: StageSpec, placement: Placement, repo_dir: str, remote: str | None
) -> dict[str, dict[str, float]]:
    """Start the stage's deployment on its work pool, wait for it, fail if that flow run failed."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(
        name=placement.deployment,
        parameters={"repo_dir": repo_dir, "stage_name": stage.name, "remote": remote},
        poll_interval=1,
    )
    if flow_run.state is None or not flow_run.state.is_completed():
        state_name = flow_run.state.name if flow_run.state else "unknown"
        raise RuntimeError(
            f"stage {stage.name!r} on {placement.pool} ({placement.deployment}) ended {state_name}: "
            f"{flow_run.state.message if flow_run.state else ''}"
        )
    return read_stage_metrics(stage, Path(repo_dir))


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
    repo_dir: str,
    dispatch: Dispatch,
    placements: dict[str, Placement],
    remote: str | None,
    retries: int,
    retry_delay_s: float,
) -> PrefectFuture:
    options = {"retries": retries, "retry_delay_seconds": retry_delay_s, "retry_jitter_factor": 0.5}
    if dispatch == "local":
        return run_stage_here.with_options(**options).submit(stage, repo_dir, remote)
    return run_stage_on_pool.with_options(**options).submit(stage, placements[stage.name], repo_dir, remote)


def schedule_stages(
    graph: StageGraph,
    repo_dir: str,
    dispatch: Dispatch,
    gpu_count: int,
    remote: str | None,
    max_parallel: int,
    retries: int,
    retry_delay_s: float,
) -> ChainReport:
    """Submit each stage once its upstream stages completed, at most ``max_parallel`` at a time.

    A stage whose upstream failed (or was itself not run) is never submitted.
    """
    logger = get_run_logger()
    by_name = graph.by_name()
    placements = place_stages(graph.names(), gpu_count)
    waiting = graph.names()
    running: dict[PrefectFuture, str] = {}
    completed: list[str] = []
    failed: dict[str, str] = {}
    not_run: list[str] = []
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    while waiting or running:
        waiting_before = len(waiting)
        for name in list(waiting):
            upstream = by_name[name].upstream
            if any(parent in failed or parent in not_run for parent in upstream):
                waiting.remove(name)
                not_run.append(name)
                logger.warning("stage %s not run: an upstream stage failed", name)
            elif all(parent in completed for parent in upstream) and len(running) < max_parallel:
                waiting.remove(name)
                running[_submit(by_name[name], repo_dir, dispatch, placements, remote, retries, retry_delay_s)] = name
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
    if failed:
        raise StageFailed(failed, not_run)
    return ChainReport(completed=tuple(completed), metrics=metrics)


@flow(name="chain", log_prints=True)
def chain(
    repo_dir: str = ".",
    targets: list[str] | None = None,
    dispatch: Dispatch = "local",
    gpu_count: int = 0,
    remote: str | None = None,
    max_parallel: int = 2,
    retries: int = 2,
    retry_delay_s: float = 2.0,
) -> ChainReport:
    """Run the DVC pipeline at ``repo_dir`` (or only what ``targets`` need) stage by stage.

    ``remote``: a DVC remote name; each stage then pulls its upstream outputs
    from it and pushes its own (for workers on several machines).
    """
    root = Path(repo_dir).resolve()
    graph = read_stage_graph(root)
    if targets:
        graph = graph.select(targets)
    get_run_logger().info("stages in order: %s", ", ".join(graph.names()))
    # Pool workers get ``repo_dir`` as given: "." then means each worker's own clone (its working directory).
    stage_repo_dir = str(root) if dispatch == "local" else repo_dir
    report = schedule_stages(graph, stage_repo_dir, dispatch, gpu_count, remote, max_parallel, retries, retry_delay_s)
    create_markdown_artifact(
        markdown="# mIoU per stage\n\n" + _miou_markdown(report.metrics),
        key="chain-miou",
        description=f"mIoU of each stage of {root}",
    )
    return report


@flow(name="stage", log_prints=True)
def stage(repo_dir: str, stage_name: str, remote: str | None = None) -> dict[str, dict[str, float]]:
    """Run one DVC stage (the flow a work pool's worker runs for ``chain(dispatch="pools")``)."""
    root = Path(repo_dir).resolve()
    spec = read_stage_graph(root).by_name().get(stage_name)
    if spec is None:
        raise KeyError(f"{root / 'dvc.yaml'}: no stage named {stage_name!r}")
    return execute_stage(spec, root, get_run_logger(), remote=remote)


def main() -> None:
    """``python -m flows.chain``: run the chain in this process (stages as local tasks)."""
    import argparse

    parser = argparse.ArgumentParser(description="Run the DVC pipeline as a Prefect flow, stage by stage.")
    parser.add_argument("--repo-dir", default=".", help="root of the DVC project (default: .)")
    parser.add_argument("--target", action="append", default=None, help="run only what this stage needs (repeatable)")
    parser.add_argument("--remote", default=None, help="DVC remote: pull upstream outputs before, push outputs after each stage")
    parser.add_argument("--max-parallel", type=int, default=2, help="stages running at once (default: 2)")
    parser.add_argument("--retries", type=int, default=2, help="retries of a failed stage (default: 2)")
    args = parser.parse_args()
    report = chain(
        repo_dir=args.repo_dir,
        targets=args.target,
        remote=args.remote,
        max_parallel=args.max_parallel,
        retries=args.retries,
    )
    print(f"completed: {', '.join(report.completed)}")


if __name__ == "__main__":
    main()

"""Time the tiny chain through the Prefect ``chain`` flow against plain ``dvc repro`` (issue #8).

Why: the flows add a server, task runs and one ``dvc repro --single-item`` per
stage on top of DVC; issue #8 asks what that costs. Two identical tiny
projects are built the way ``tests/test_end_to_end.py`` builds one (copies of
``dvc.yaml``, ``pipeline/``, ``weakclip_core/``, the tiny ``params.yaml`` of
``tests/faults/tiny_chain.py``, git + DVC init, one commit). Project A runs
``dvc repro`` as a subprocess (wall clock of the whole command); project B
runs ``flows.chain.chain`` in this process against a loopback Prefect server
with a temporary ``PREFECT_HOME``, as ``tests/test_flows.py`` does. Reported:
the server's start-up (process start to a healthy ``/health``), the flow call's
wall clock, the flow run's start-to-end time as the server recorded it, the
1-minute load average before each measurement, and which of the two projects'
``dvc.lock`` outs differ in md5 (only metrics JSONs whose differing keys are the
stages' own recorded wall times may).

Usage: ``python -m bench.prefect_overhead [--repeats 2] [--max-parallel 1] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
TIMING_KEY = re.compile(r"(^|\.)(wall_s|\w*_s_per_\w+|\w*_seconds)$")  # metrics keys that record a duration


def load_average() -> float:
    """The 1-minute load average (the machine is shared; every timing carries it)."""
    return os.getloadavg()[0]


def build_project(project: Path) -> None:
    """A git + DVC repository at ``project`` exactly as the end-to-end test's ``chain`` fixture makes it."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_end_to_end import build_tiny_project  # noqa: PLC0415

    build_tiny_project(project, "tiny project for the Prefect overhead bench")


def lock_hashes(project: Path) -> dict[str, dict[str, str]]:
    """``{stage: {out path: md5}}`` from the project's dvc.lock."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {
        stage: {out["path"]: out["md5"] for out in entry.get("outs", [])} for stage, entry in lock["stages"].items()
    }


def differing_json_keys(first: Path, second: Path) -> list[str]:
    """Dotted keys whose values differ between two JSON files (a key missing on one side counts)."""

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            return {
                key: value for name, child in node.items() for key, value in flat(child, f"{prefix}{name}.").items()
            }
        return {prefix.rstrip("."): node}

    left, right = flat(json.loads(first.read_text())), flat(json.loads(second.read_text()))
    return sorted(key for key in left.keys() | right.keys() if left.get(key) != right.get(key))


def compare_locks(first: Path, second: Path) -> dict[str, Any]:
    """Which dvc.lock outs differ in md5 between two projects, and for JSON outs which keys differ.

    The stages' metrics files record their own wall times (``wall_s``, ``train_s_per_step``), so two
    runs of the same chain differ there and only there; every other out must have the same md5.
    """
    hashes_first, hashes_second = lock_hashes(first), lock_hashes(second)
    differing = []
    for stage in sorted(hashes_first.keys() | hashes_second.keys()):
        outs_first, outs_second = hashes_first.get(stage, {}), hashes_second.get(stage, {})
        for path in sorted(outs_first.keys() | outs_second.keys()):
            if outs_first.get(path) == outs_second.get(path):
                continue
            keys = differing_json_keys(first / path, second / path) if path.endswith(".json") else None
            differing.append({"stage": stage, "path": path, "json_keys": keys})
    timing_only = all(
        entry["json_keys"] is not None and all(TIMING_KEY.search(key) for key in entry["json_keys"])
        for entry in differing
    )
    n_outs = sum(len(outs) for outs in hashes_first.values())
    return {"n_outs": n_outs, "differing": differing, "equal_but_timings": timing_only}


def time_dvc_repro(project: Path) -> dict[str, Any]:
    """Wall clock of ``dvc repro`` (the whole command) in ``project``."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_end_to_end import DVC, REPRO_TIMEOUT_S, ran_stages, run  # noqa: PLC0415

    load = load_average()
    start = time.perf_counter()
    output = run([*DVC, "repro"], project, timeout=REPRO_TIMEOUT_S)
    return {"seconds": time.perf_counter() - start, "load_1min_before": load, "stages": len(ran_stages(output))}


def time_flow(project: Path, max_parallel: int) -> dict[str, Any]:
    """The ``chain`` flow on ``project`` in this process: call wall clock and the server-recorded run time."""
    from prefect import get_client  # noqa: PLC0415

    from flows.chain import chain  # noqa: PLC0415

    load = load_average()
    start = time.perf_counter()
    state = chain(repo_dir=str(project), max_parallel=max_parallel, retry_delay_s=0.2, return_state=True)
    call_seconds = time.perf_counter() - start
    if not state.is_completed():
        raise RuntimeError(f"chain flow on {project} ended {state.name}: {state.message}")
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
    recorded = (flow_run.end_time - flow_run.start_time).total_seconds()
    return {
        "seconds": call_seconds,
        "flow_run_seconds": recorded,
        "load_1min_before": load,
        "stages": len(state.result().completed),
    }


def measure(work: Path, repeats: int, max_parallel: int) -> dict[str, Any]:
    """Alternate dvc repro (A) and the flow (B) ``repeats`` times on fresh projects, under one server."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings  # noqa: PLC0415

    from flows.local_server import drain_prefect_clients, local_prefect_server  # noqa: PLC0415

    results: dict[str, Any] = {"max_parallel": max_parallel, "cpu_count": os.cpu_count(), "runs": []}
    load = load_average()
    start = time.perf_counter()
    with local_prefect_server(work / "prefect_home") as server:
        results["server_start"] = {"seconds": time.perf_counter() - start, "load_1min_before": load}
        print(f"server healthy after {results['server_start']['seconds']:.1f} s (load {load:.2f})", flush=True)
        with temporary_settings({PREFECT_API_URL: server.api_url, PREFECT_SERVER_ANALYTICS_ENABLED: False}):
            for index in range(repeats):
                project_a = work / f"run{index}" / "dvc_repro"
                project_b = work / f"run{index}" / "flow"
                build_project(project_a)
                build_project(project_b)
                repro = time_dvc_repro(project_a)
                print(f"run {index}: dvc repro {repro['seconds']:.1f} s (load {repro['load_1min_before']:.2f})",
                      flush=True)
                flow_timing = time_flow(project_b, max_parallel)
                print(f"run {index}: chain flow {flow_timing['seconds']:.1f} s call, "
                      f"{flow_timing['flow_run_seconds']:.1f} s flow run (load {flow_timing['load_1min_before']:.2f})",
                      flush=True)
                locks = compare_locks(project_a, project_b)
                results["runs"].append({"dvc_repro": repro, "flow": flow_timing, "locks": locks})
                print(f"run {index}: dvc.lock outs: {locks['n_outs'] - len(locks['differing'])}/{locks['n_outs']} "
                      f"md5 equal; the others differ only in timing keys: {locks['equal_but_timings']}", flush=True)
            drain_prefect_clients()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description="Time the tiny chain: Prefect chain flow vs plain dvc repro.")
    parser.add_argument("--repeats", type=int, default=2, help="A/B pairs, each on fresh projects (default: 2)")
    parser.add_argument("--max-parallel", type=int, default=1,
                        help="the flow's stages at once (default 1: serial, like dvc repro)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    work = Path(tempfile.mkdtemp(prefix="prefect_overhead_"))
    os.environ["PREFECT_HOME"] = str(work / "prefect_home")  # before prefect is imported: no state in ~/.prefect
    sys.path.insert(0, str(REPO))
    print(f"projects and Prefect home under {work}", flush=True)
    results = measure(work, args.repeats, args.max_parallel)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        from weakclip_core.artifacts.atomic import write_text  # noqa: PLC0415

        write_text(args.out, text + "\n")


if __name__ == "__main__":
    main()

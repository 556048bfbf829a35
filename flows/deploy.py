"""The project's deploy step: work pools, queues with their concurrency limits, and the deployments.

``python -m flows.deploy --gpus N`` (from the repository root, ``PREFECT_API_URL`` set):

- pools ``weakclip-cpu`` and ``weakclip-gpu`` (process workers), created when missing;
- queues ``coordinator`` (the chain) and ``cpu`` (CPU stages) in the CPU pool, and ``gpu-0`` ..
  ``gpu-<N-1>`` in the GPU pool, each with concurrency limit 1: at most one stage per GPU at a time
  (``--gpus-per-stage K``: N/K queues, each a slot of K GPUs, for DDP stages with ``runtime.nproc: K``);
  GPU queues beyond N are paused and deployments beyond N deleted, so the chain's GPU count
  (``stage/stage-gpu-<i>`` in a row) is what was deployed last;
- the deployments of ``prefect.yaml``, with ``stage-gpu-0`` used as the template of every GPU.
"""

from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from flows.resources import (
    COORDINATOR_QUEUE,
    CPU_POOL,
    CPU_STAGE_QUEUE,
    GPU_POOL,
    STAGE_FLOW_NAME,
    gpu_queue,
    gpu_stage_deployment,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def gpu_slots(gpus: int, gpus_per_stage: int) -> list[str]:
    """``CUDA_VISIBLE_DEVICES`` of each GPU deployment: ``gpus`` GPUs cut into slots of ``gpus_per_stage``
    (``--gpus 4 --gpus-per-stage 2`` → ``["0,1", "2,3"]``), so a stage under ``runtime.launcher: torchrun`` with
    ``runtime.nproc: 2`` finds its two GPUs. Refuses a count that does not divide (SystemExit, one line)."""
    if gpus < 0:
        raise SystemExit(f"--gpus must be >= 0, got {gpus}")
    if gpus_per_stage < 1 or gpus % gpus_per_stage:
        raise SystemExit(f"--gpus-per-stage {gpus_per_stage} must be at least 1 and divide --gpus {gpus}")
    return [",".join(str(slot * gpus_per_stage + offset) for offset in range(gpus_per_stage))
            for slot in range(gpus // gpus_per_stage)]


def deployments_for(gpus: int, prefect_yaml: Path, gpus_per_stage: int = 1) -> dict:
    """prefect.yaml with the GPU template expanded to one deployment per GPU slot (``gpu_slots``; none for
    ``gpus == 0``)."""
    document = yaml.safe_load(prefect_yaml.read_text())
    template = next(d for d in document["deployments"] if d["name"] == gpu_stage_deployment(0))
    others = [d for d in document["deployments"] if not d["name"].startswith("stage-gpu-")]
    gpu_deployments = []
    for index, devices in enumerate(gpu_slots(gpus, gpus_per_stage)):
        entry = copy.deepcopy(template)
        entry["name"] = gpu_stage_deployment(index)
        entry["description"] = f"One DVC stage on GPU{'s' if ',' in devices else ''} {devices}."
        entry["work_pool"]["work_queue_name"] = gpu_queue(index)
        entry["work_pool"].setdefault("job_variables", {}).setdefault("env", {})["CUDA_VISIBLE_DEVICES"] = devices
        gpu_deployments.append(entry)
    document["deployments"] = others + gpu_deployments
    return document


def ensure_queues(gpus: int) -> dict[str, int | None]:
    """Pools and queues with their limits; returns ``{"<pool>/<queue>": limit}`` as the server holds them."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    wanted: dict[tuple[str, str], int | None] = {(CPU_POOL, COORDINATOR_QUEUE): None, (CPU_POOL, CPU_STAGE_QUEUE): None}
    wanted.update({(GPU_POOL, gpu_queue(index)): 1 for index in range(gpus)})
    with get_client(sync_client=True) as client:
        for pool in (CPU_POOL, GPU_POOL):
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            except ObjectAlreadyExists:
                pass
        for (pool, name), limit in wanted.items():
            try:
                queue = client.read_work_queue_by_name(name, work_pool_name=pool)
                client.update_work_queue(queue.id, concurrency_limit=limit, is_paused=False)
            except ObjectNotFound:
                client.create_work_queue(name=name, work_pool_name=pool, concurrency_limit=limit)
        for queue in client.read_work_queues(work_pool_name=GPU_POOL):
            if queue.name.startswith("gpu-") and (GPU_POOL, queue.name) not in wanted:
                client.update_work_queue(queue.id, is_paused=True)
                try:
                    client.delete_deployment(
                        client.read_deployment_by_name(f"{STAGE_FLOW_NAME}/stage-{queue.name}").id
                    )
                except ObjectNotFound:
                    pass
        return {
            f"{pool}/{queue.name}": queue.concurrency_limit
            for pool in (CPU_POOL, GPU_POOL)
            for queue in client.read_work_queues(work_pool_name=pool)
            if not queue.is_paused
        }


def deploy(gpus: int, root: Path = REPO_ROOT, gpus_per_stage: int = 1) -> dict[str, int | None]:
    """Pools, queues (one per GPU slot, limit 1) and deployments; returns ``{"<pool>/<queue>": limit}``."""
    slots = len(gpu_slots(gpus, gpus_per_stage))
    ensure_queues(slots)
    document = deployments_for(gpus, root / "prefect.yaml", gpus_per_stage)
    with tempfile.TemporaryDirectory() as tmp:
        prefect_file = Path(tmp) / "prefect.yaml"
        prefect_file.write_text(yaml.safe_dump(document, sort_keys=False))
        from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL

        env = dict(os.environ, PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
        env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
        if PREFECT_API_AUTH_STRING.value():
            env["PREFECT_API_AUTH_STRING"] = PREFECT_API_AUTH_STRING.value().get_secret_value() if hasattr(
                PREFECT_API_AUTH_STRING.value(), "get_secret_value") else str(PREFECT_API_AUTH_STRING.value())
        completed = subprocess.run(
            [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)],
            cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False,
        )
        if completed.returncode != 0:
            raise SystemExit(f"prefect deploy failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}")
    return ensure_queues(slots)  # `prefect deploy` creates missing queues without limits: set them again


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, required=True, help="GPUs of the GPU pool (0: CPU only)")
    parser.add_argument("--gpus-per-stage", type=int, default=1,
                        help="GPUs each stage run sees (default 1); runtime.nproc of a torchrun stage must not exceed it")
    args = parser.parse_args()
    for queue, limit in sorted(deploy(args.gpus, gpus_per_stage=args.gpus_per_stage).items()):
        print(f"{queue}: concurrency limit {limit if limit is not None else 'none'}")


if __name__ == "__main__":
    main()

"""Which stages need a GPU, and which work pool and deployment runs each stage.

The table is a list of ``fnmatch`` patterns over DVC stage names, so a
``foreach`` stage is matched for all its items (``seg_train@*``). Every stage
not in the table is a CPU stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

GPU_STAGE_PATTERNS: tuple[str, ...] = (
    "clip",  # pre-trains the small CLIP, or runs ViT-B/16 (and a random one) over the val and scored train images
    "cam_train",
    "cam_infer",
    "weakclip_train",
    "pseudo_masks",
    "seg_train@*",
    "seg_eval@*",  # runs the segmenter: on the presets ResNet-101 over ten views per val image
)

CPU_POOL = "weakclip-cpu"
GPU_POOL = "weakclip-gpu"
STAGE_FLOW_NAME = "stage"
CPU_STAGE_DEPLOYMENT = "stage-cpu"
# Queues: the chain (the coordinator) and the CPU stages poll different queues of the CPU pool, so a
# coordinator's worker never runs stages in the coordinator's clone; one queue per GPU, limit 1 (flows.deploy).
COORDINATOR_QUEUE = "coordinator"
CPU_STAGE_QUEUE = "cpu"


def needs_gpu(stage_name: str) -> bool:
    """True when ``stage_name`` (a DVC address such as ``seg_train@gt``) trains or infers a model."""
    return any(fnmatchcase(stage_name, pattern) for pattern in GPU_STAGE_PATTERNS)


def gpu_stage_deployment(gpu_index: int) -> str:
    """The deployment pinned to GPU ``gpu_index`` (its job variables set ``CUDA_VISIBLE_DEVICES``)."""
    return f"stage-gpu-{gpu_index}"


def gpu_queue(gpu_index: int) -> str:
    """The GPU pool's queue of GPU ``gpu_index`` (concurrency limit 1: one stage per GPU at a time)."""
    return f"gpu-{gpu_index}"


@dataclass(frozen=True)
class Placement:
    """Where one stage runs: ``deployment`` is ``<flow name>/<deployment name>``."""

    pool: str
    deployment: str
    gpu_index: int | None
    queue: str = CPU_STAGE_QUEUE


def place_stages(stage_names: list[str], gpu_count: int) -> dict[str, Placement]:
    """CPU stages to the CPU deployment; GPU stages round-robin over ``gpu_count`` GPU deployments.

    With ``gpu_count == 0`` every stage runs on the CPU pool (a machine without GPUs).
    """
    if gpu_count < 0:
        raise ValueError(f"gpu_count must be >= 0, got {gpu_count}")
    placements: dict[str, Placement] = {}
    next_gpu = 0
    for name in stage_names:
        if needs_gpu(name) and gpu_count > 0:
            index = next_gpu % gpu_count
            next_gpu += 1
            placements[name] = Placement(
                GPU_POOL, f"{STAGE_FLOW_NAME}/{gpu_stage_deployment(index)}", index, gpu_queue(index)
            )
        else:
            placements[name] = Placement(CPU_POOL, f"{STAGE_FLOW_NAME}/{CPU_STAGE_DEPLOYMENT}", None)
    return placements

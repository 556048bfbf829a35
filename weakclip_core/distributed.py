"""Data-parallel training helpers (DDP): process-group setup, data split, rank-0 writes, launcher.

A training stage runs unchanged as one process (``runtime.launcher: none``) or
as ``runtime.nproc`` DDP processes under ``torchrun`` (``runtime.launcher:
torchrun``). Under torchrun every process reads ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` from its environment; the
backend is NCCL on CUDA and Gloo on CPU. DDP averages gradients over the
processes, so N processes with per-process batch ``B`` take the same step as
one process with batch ``N * B`` (shards of equal size, loss averaged over the
batch). Nothing here keeps global state: the ``DistributedContext`` is passed
around.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from weakclip_core.config.params import RuntimeConfig
from weakclip_core.device import resolve_device

ResultT = TypeVar("ResultT")

TORCHRUN_ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job. ``world_size == 1`` means no process group was made."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files (checkpoints, metrics, CAM stores): one writer per output."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_int(env: dict[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as error:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer (set by torchrun)") from error


def init_distributed(requested_device: str = "auto", env: dict[str, str] | None = None) -> DistributedContext:
    """Join the process group torchrun describes in the environment, or run alone when there is none.

    ``requested_device`` is ``runtime.device``. On CUDA each process takes GPU
    ``LOCAL_RANK`` and NCCL; on CPU, Gloo.
    """
    environment = dict(os.environ if env is None else env)
    device = resolve_device(requested_device)
    if "WORLD_SIZE" not in environment or _env_int(environment, "WORLD_SIZE") == 1:
        return DistributedContext(rank=0, local_rank=0, world_size=1, device=device, backend=None)
    missing = [key for key in TORCHRUN_ENV_KEYS if key not in environment]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is set but {missing} are not: start the stage with torchrun")
    rank = _env_int(environment, "RANK")
    local_rank = _env_int(environment, "LOCAL_RANK")
    world_size = _env_int(environment, "WORLD_SIZE")
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method=f"tcp://{environment['MASTER_ADDR']}:{environment['MASTER_PORT']}",
            rank=rank,
            world_size=world_size,
        )
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device, backend=backend)


def shutdown_distributed(context: DistributedContext) -> None:
    """Leave the process group (a no-op when running alone)."""
    if context.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """Move ``model`` to the context's device; under DDP wrap it so ``backward`` averages gradients."""
    model = model.to(context.device)
    if not context.is_distributed:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (what a checkpoint saves: keys without ``module.``)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def per_process_batch_size(global_batch_size: int, context: DistributedContext) -> int:
    """Split the configured (global) batch evenly; an uneven split would change the averaged gradient."""
    if global_batch_size % context.world_size != 0:
        raise ValueError(
            f"batch size {global_batch_size} does not divide over {context.world_size} processes "
            f"(runtime.nproc); pick a multiple of {context.world_size}"
        )
    return global_batch_size // context.world_size


def make_sampler(dataset: Dataset, context: DistributedContext, shuffle: bool, seed: int) -> DistributedSampler:
    """A ``DistributedSampler`` for this process: rank ``r`` of ``W`` gets ``order[r::W]``.

    With one process it is an ordinary (optionally shuffled) sampler, so the
    same code path serves both. ``drop_last=True`` keeps every shard the same
    length. Call ``sampler.set_epoch(epoch)`` each epoch for a new shuffle.
    """
    return DistributedSampler(
        dataset,
        num_replicas=context.world_size,
        rank=context.rank,
        shuffle=shuffle,
        seed=seed,
        drop_last=True,
    )


def barrier(context: DistributedContext) -> None:
    """Wait for every process (no-op alone)."""
    if context.is_distributed:
        dist.barrier()


def run_on_main(context: DistributedContext, write: Callable[[], ResultT]) -> ResultT | None:
    """Call ``write`` on rank 0 only, then let every process continue once it is done.

    Use for every file a stage writes, so N processes never race on one output.
    """
    result = write() if context.is_main else None
    barrier(context)
    return result


def all_reduce_mean(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """The mean of ``value`` over processes (for logging a loss or a metric the same on every rank)."""
    if not context.is_distributed:
        return value
    reduced = value.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / context.world_size


def stage_command(module: str, runtime: RuntimeConfig, args: Sequence[str] = ()) -> list[str]:
    """The command that runs stage ``module`` (``pipeline.cam_train``) as ``runtime`` asks.

    ``launcher: none`` → ``python -m <module> <args>``;
    ``launcher: torchrun`` → ``torchrun --standalone --nproc_per_node <nproc> -m <module> <args>``.
    """
    if runtime.launcher == "none":
        return [sys.executable, "-m", module, *args]
    torchrun = Path(sys.executable).parent / "torchrun"
    executable = str(torchrun) if torchrun.exists() else (shutil.which("torchrun") or "torchrun")
    return [executable, "--standalone", "--nproc_per_node", str(runtime.nproc), "-m", module, *args]


def relaunch_under_torchrun(module: str, runtime: RuntimeConfig, args: Sequence[str]) -> int | None:
    """Re-run this stage under torchrun when asked and not already under it; returns its exit code.

    A stage's ``main()`` calls this first: ``None`` means "carry on in this
    process" (launcher none, or already a torchrun worker); an int means the
    torchrun job ran and the stage should exit with that code.
    """
    if runtime.launcher != "torchrun" or "LOCAL_RANK" in os.environ:
        return None
    return subprocess.run(stage_command(module, runtime, args), check=False).returncode

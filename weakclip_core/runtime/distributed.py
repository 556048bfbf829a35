"""Data-parallel training helpers (DDP): process-group setup, data split, rank-0 writes, launcher.

A training stage runs unchanged as one process (``runtime.launcher: none``) or
as ``runtime.nproc`` DDP processes under ``torchrun`` (``runtime.launcher:
torchrun``; the relaunch is the stage runner's, ``pipeline/_stage.py``). Under torchrun every process reads ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` from its environment; the
backend is NCCL on CUDA and Gloo on CPU. DDP averages gradients over the
processes, so N processes with per-process batch ``B`` take the same step as
one process with batch ``N * B`` (shards of equal size, loss averaged over the
batch). Nothing here keeps global state: the ``DistributedContext`` is passed
around.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import Dataset, DistributedSampler, Sampler

from weakclip_core.runtime.device import resolve_device

ResultT = TypeVar("ResultT")
KeyT = TypeVar("KeyT")

TORCHRUN_ENV_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

COLLECTIVE_TIMEOUT = timedelta(hours=3)
"""How long a rank waits in a collective for the others. Rank 0 alone runs some evaluations (``cam_train``: its
val mAP each epoch, COCO's 40,504 val images; ``clip``: the zero-shot check and the dense probe) while the other
ranks wait in the next collective; at NCCL's default of 10 minutes they gave up mid-evaluation (``weakclip_train``'s
train-split score, before every rank scored a share of it) and torchrun killed the job with the trained model
unsaved. The cost: a rank that really hangs is noticed after 3 h."""


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
        """A process group exists (torchrun, any ``nproc``): models are DDP-wrapped, batches sharded."""
        return self.backend is not None


def single_process_context(device: torch.device) -> DistributedContext:
    """The context of a plain ``python -m`` run: rank 0 of 1, no process group."""
    return DistributedContext(rank=0, local_rank=0, world_size=1, device=device, backend=None)


def _env_int(env: dict[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError as error:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer (set by torchrun)") from error


def init_distributed(requested_device: str = "auto", env: dict[str, str] | None = None) -> DistributedContext:
    """Join the process group torchrun describes in the environment, or run alone when there is none.

    ``requested_device`` is ``runtime.device``. On CUDA each process takes GPU
    ``LOCAL_RANK`` and NCCL; on CPU, Gloo. Under torchrun a group is made even
    for one process (``nproc: 1``), so that run takes the DDP code path.
    """
    environment = dict(os.environ if env is None else env)
    device = resolve_device(requested_device)
    missing = [key for key in TORCHRUN_ENV_KEYS if key not in environment]
    if "WORLD_SIZE" not in environment or (missing and _env_int(environment, "WORLD_SIZE") == 1):
        return single_process_context(device)
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
            timeout=COLLECTIVE_TIMEOUT,
        )
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size, device=device, backend=backend)


def shutdown_distributed(context: DistributedContext) -> None:
    """Leave the process group (a no-op when running alone)."""
    if context.is_distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, context: DistributedContext, frozen_prefixes: Sequence[str] = ()) -> nn.Module:
    """Move ``model`` to the context's device; under DDP wrap it so ``backward`` averages gradients.

    Under DDP the batch norms first become cross-process ones
    (:func:`synchronise_batch_norms`: statistics of the global batch, as one
    process would compute them). Parameters and buffers under
    ``frozen_prefixes`` (e.g. ``"clip."``: the frozen CLIP, identical on every
    rank because every rank loads the same file) are left out of DDP: never
    broadcast at start, never synced. Every trainable parameter must get a
    gradient each step (``find_unused_parameters=False``). Keep a reference to
    the plain ``model`` for checkpoints; the wrapper is only for ``forward``.
    """
    model = model.to(context.device)
    if not context.is_distributed:
        return model
    synchronise_batch_norms(model, context)
    if frozen_prefixes:
        names = [name for name, _ in [*model.named_parameters(), *model.named_buffers()]
                 if name.startswith(tuple(frozen_prefixes))]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


class _AllReduceSum(torch.autograd.Function):
    """Sum over processes whose backward sums the gradients over processes too (every rank's loss
    depends on every rank's input)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor) -> torch.Tensor:  # noqa: ANN401 — autograd's context
        reduced = local.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad_output)


class _AllGather(torch.autograd.Function):
    """(b, ...) per rank → W tensors (b, ...) in rank order; the backward gives each rank the sum over
    ranks of the gradients of its own rows (every rank computes the same global loss)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx: Any, *grad_parts: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([part.contiguous() for part in grad_parts])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        return stacked[dist.get_rank()]


class AllReduceBatchNorm(_BatchNorm):
    """Batch norm whose training statistics are those of the batch over all processes (Gloo, CPU).

    ``torch.nn.SyncBatchNorm`` runs on GPUs only; this is its CPU counterpart,
    built on autograd-aware all-reduces: mean and biased variance over the
    ``(N, *spatial)`` elements of every process (input ``(N, C, ...)``), the
    running statistics updated with the unbiased variance, exactly as one
    ``BatchNorm`` sees the concatenated batch. The backward all-reduces the
    statistics' gradients, so DDP's averaged gradients equal one process's.
    Same parameters, buffers and ``state_dict`` keys as ``BatchNorm``.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an (N, C, ...) input, got {input.dim()} dimensions")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and self.track_running_stats) or self.running_mean is None:
            return super().forward(input)
        # Statistics accumulate in float64, as torch's CPU batch norm does: with few elements per channel
        # the normalisation is ill-conditioned and float32 sums would move the gradients by ~1 %.
        channel_shape = (1, -1) + (1,) * (input.dim() - 2)
        reduce_dims = [0, *range(2, input.dim())]
        local_count = torch.tensor([input.numel() // input.shape[1]], dtype=torch.float64, device=input.device)
        sums = _AllReduceSum.apply(torch.cat([input.sum(reduce_dims, dtype=torch.float64), local_count]))
        count = sums[-1].detach()
        mean = sums[:-1] / count
        centred = input - mean.to(input.dtype).view(channel_shape)
        variance = _AllReduceSum.apply((centred * centred).sum(reduce_dims, dtype=torch.float64)) / count
        # y = x * scale + shift, as torch's kernel rounds it (same outputs bit for bit, so max-pool ties
        # after a ReLU break the same way as in one process)
        scale = torch.rsqrt(variance + self.eps).to(input.dtype)
        input_mean = mean.to(input.dtype)
        if self.affine:
            scale = scale * self.weight
            shift = self.bias - input_mean * scale
        else:
            shift = -input_mean * scale
        output = input * scale.view(channel_shape) + shift.view(channel_shape)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
            unbiased = variance.detach() * (count / torch.clamp(count - 1, min=1))
            self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return output


def synchronise_batch_norms(model: nn.Module, context: DistributedContext) -> None:
    """Replace ``model``'s batch norms in place by cross-process ones (no-op alone).

    CUDA: ``torch.nn.SyncBatchNorm``; CPU: :class:`AllReduceBatchNorm`. The new
    modules hold the very same parameter and buffer tensors, so an optimizer
    built before, a checkpoint and ``state_dict`` keys are unaffected.
    """
    if not context.is_distributed:
        return
    replacement_type = nn.SyncBatchNorm if context.device.type == "cuda" else AllReduceBatchNorm
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, _BatchNorm) or isinstance(child, (nn.SyncBatchNorm, AllReduceBatchNorm)):
                continue
            replacement = replacement_type(child.num_features, child.eps, child.momentum, child.affine,
                                           child.track_running_stats)
            if child.affine:
                replacement.weight, replacement.bias = child.weight, child.bias
            if child.track_running_stats:
                replacement.running_mean, replacement.running_var = child.running_mean, child.running_var
                replacement.num_batches_tracked = child.num_batches_tracked
            replacement.train(child.training)
            setattr(parent, name, replacement)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (what a checkpoint saves: keys without ``module.``)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def per_process_batch_size(global_batch_size: int, context: DistributedContext, key: str = "batch size") -> int:
    """Split the configured (global) batch evenly; an uneven split would change the averaged gradient.

    ``key`` names the params key of the batch (``seg.train.batch_size``) in the error.
    """
    if global_batch_size % context.world_size != 0:
        raise ValueError(
            f"{key}: {global_batch_size} does not divide over runtime.nproc = {context.world_size} processes; "
            f"pick a multiple of {context.world_size}"
        )
    return global_batch_size // context.world_size


def shard_bounds(batch_length: int, context: DistributedContext) -> tuple[int, int]:
    """This rank's ``[start, stop)`` of a global batch of ``batch_length``: contiguous, sizes differ by ≤ 1.

    Contiguous shards in rank order: gathering them in rank order gives back
    the global batch in its order (what the contrastive loss relies on).
    """
    base, extra = divmod(batch_length, context.world_size)
    start = context.rank * base + min(context.rank, extra)
    return start, start + base + (1 if context.rank < extra else 0)


class ShardedKeySampler(Sampler[KeyT]):
    """This rank's share of a sampler that yields a global batch as ``global_batch`` consecutive keys.

    The stages' samplers (``StepSampler``) fix the data order as a pure
    function of (seed, epoch): that already is a seeded, per-epoch shuffle
    (what ``DistributedSampler`` + ``set_epoch`` give), and every process
    computes the same order. Rank ``r`` keeps its contiguous ``1/W`` of each
    global batch, so the union over ranks of step ``s`` is exactly the batch
    one process sees at step ``s``: same samples, same augmentations.
    """

    def __init__(self, sampler: Sampler[KeyT], global_batch: int, context: DistributedContext) -> None:
        self.sampler = sampler
        self.global_batch = global_batch
        self.local_batch = per_process_batch_size(global_batch, context)
        self.start, self.stop = shard_bounds(global_batch, context)

    def __len__(self) -> int:
        return len(self.sampler) // self.global_batch * self.local_batch  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[KeyT]:
        batch: list[KeyT] = []
        for key in self.sampler:
            batch.append(key)
            if len(batch) == self.global_batch:
                yield from batch[self.start:self.stop]
                batch = []


class ShardedBatchSampler(Sampler[list[KeyT]]):
    """This rank's share of each batch of a batch sampler (a short last batch is split as evenly as it goes).

    Pair with :func:`shard_loss_weight` so unequal shards still average to the global batch's mean loss.
    """

    def __init__(self, batch_sampler: Sampler[list[KeyT]], context: DistributedContext) -> None:
        self.batch_sampler = batch_sampler
        self.context = context

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[KeyT]]:
        for batch in self.batch_sampler:
            start, stop = shard_bounds(len(batch), self.context)
            yield batch[start:stop]


def shard_loss_weight(local_count: int, global_count: int, context: DistributedContext) -> float:
    """Factor on a shard's mean loss so DDP's average over ranks is the global batch's mean.

    DDP averages gradients: ``(1/W) Σ_r w_r L_r`` with ``w_r = W n_r / n`` is
    ``Σ_r n_r L_r / n``, the mean over all ``n`` samples. Exactly 1.0 for equal shards.
    """
    return local_count * context.world_size / global_count


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


def all_reduce_sum(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """The sum of ``value`` over processes, without gradient (counts, normalisers)."""
    if not context.is_distributed:
        return value
    reduced = value.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced


def gather_with_grad(local: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """(b, ...) on each rank → (W b, ...) in rank order, with gradient flowing back to every rank's rows.

    For losses that compare every sample with every other (CLIP's N×N logits):
    each rank computes the whole loss; the backward sums the rows' gradients
    over ranks and DDP's average divides by ``W``, so each parameter gets the
    gradient of the one global loss.
    """
    if not context.is_distributed:
        return local
    return torch.cat(_AllGather.apply(local), dim=0)


def gather_objects(local: list[ResultT], context: DistributedContext) -> list[ResultT]:
    """Concatenate a small picklable list over ranks, in rank order (e.g. a batch's captions)."""
    if not context.is_distributed:
        return local
    gathered: list[list[ResultT] | None] = [None] * context.world_size
    dist.all_gather_object(gathered, local)
    return [item for part in gathered for item in (part or [])]


def broadcast_from_main(value: ResultT | None, context: DistributedContext) -> ResultT | None:
    """Rank 0's ``value`` on every rank (a small picklable result, e.g. the stage's metrics)."""
    if not context.is_distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(value: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """The mean of ``value`` over processes (for logging a loss or a metric the same on every rank)."""
    if not context.is_distributed:
        return value
    reduced = value.detach().clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / context.world_size


@contextmanager
def distributed_context(requested_device: str) -> Iterator[DistributedContext]:
    """:func:`init_distributed` for the ``with`` block, leaving the process group at its end."""
    context = init_distributed(requested_device)
    try:
        yield context
    finally:
        shutdown_distributed(context)

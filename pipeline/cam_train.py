"""Stage ``cam_train``: train MCTformer-V2 on image-level labels (docs/METHOD.md §1).

Both outputs (class-token logits, GAP of the PatchCAMs) are trained with the
multi-label soft-margin loss; AdamW with ``lr * batch_size / 512``, linear
warm-up then cosine. Every ``checkpoint_every`` steps and at each epoch end the
model, optimizer, step and RNG state are checkpointed; a killed run resumes
from the last checkpoint and, because data order and augmentation are pure
functions of (seed, epoch, index), reaches bit-identical weights on CPU.

Writes ``artifacts/mctformer/model.pt`` and dvclive logs (loss, lr, val mAP
per epoch) under ``dvclive/cam_train/``; clears its checkpoints when done. With ``cam.source`` other than
``train`` (imported CAMs) it trains nothing and writes ``artifacts/mctformer/not_trained.json`` saying why.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from weakclip_core.artifacts.atomic import sha256_of_file
from weakclip_core.config import CamTrainConfig, Params, to_plain, to_plain_without_defaults
from weakclip_core.data.classification import (ClassificationAugment, ClassificationDataset, EpochBatchSampler,
                                               steps_per_epoch)
from weakclip_core.data.layout import LABELS_FILE, PreparedDataset
from weakclip_core.runtime.device import resolve_device, seed_everything, set_threads
from weakclip_core.runtime.distributed import (DistributedContext, ShardedBatchSampler, broadcast_from_main,
                                               gather_objects, per_process_batch_size, run_on_main, shard_bounds,
                                               shard_loss_weight, single_process_context, wrap_model)
from weakclip_core.evaluation.metrics import mean_average_precision
from weakclip_core.models.mctformer import MCTformerV2, build_mctformer, load_deit_weights
from weakclip_core.artifacts.model_file import NOT_TRAINED_FILE, save_final_model
from weakclip_core.config.schema import ConfigError, given_path
from weakclip_core.training.checkpoint import CHECKPOINT_ROOT, Checkpointer
from weakclip_core.training.loop import LoopPlan, LoopState, WindowEnd, run_training_loop
from weakclip_core.training.schedules import timm_epoch_cosine_lr, warmup_cosine_lr

from pipeline._stage import (LIVE_HISTORY_KEY, LiveLog, StageSpec, params_key, record_not_trained, run_stage,
                             run_stage_cli)

STAGE = "cam_train"


@dataclass(frozen=True)
class CamTrainPaths:
    """Where the stage writes (dvc.yaml's outs); tests point these into a temporary folder."""

    model: Path = Path("artifacts/mctformer/model.pt")
    live_dir: Path = Path("dvclive/cam_train")
    checkpoint_root: Path = CHECKPOINT_ROOT


@dataclass(frozen=True)
class CamTrainResult:
    model_path: Path
    steps: int
    val_map_class_token: float
    val_map_patch_cam: float


@torch.no_grad()
def evaluate_map(model: MCTformerV2, loader: DataLoader, device: torch.device,
                 context: DistributedContext | None = None) -> tuple[float, float]:
    """(class-token mAP, PatchCAM mAP) on ``loader``'s images. Under DDP each rank's ``loader`` holds its own
    contiguous share of the split (:func:`val_shard`); the scores are gathered in rank order, so every rank
    gets the mAP of the whole split in its order (AP needs all the scores at once: it does not add up)."""
    model.eval()
    class_scores, patch_scores, targets = [], [], []
    for images, labels in loader:
        output = model(images.to(device))
        class_scores.append(torch.sigmoid(output.class_logits).cpu().numpy())
        patch_scores.append(torch.sigmoid(output.patch_logits).cpu().numpy())
        targets.append(labels.numpy())
    local = [(np.concatenate(class_scores), np.concatenate(patch_scores), np.concatenate(targets))] if targets else []
    shards = gather_objects(local, context) if context is not None else local
    target_array = np.concatenate([shard[2] for shard in shards])
    return (mean_average_precision(np.concatenate([shard[0] for shard in shards]), target_array),
            mean_average_precision(np.concatenate([shard[1] for shard in shards]), target_array))


def val_shard(val_set: ClassificationDataset, context: DistributedContext) -> Dataset:
    """This rank's contiguous share of the val split (all of it in one process): under DDP each epoch's
    evaluation is shared out over the ranks, as the reference's ``--dist-eval``, instead of rank 0 scoring the
    whole split (COCO's 40,504 images, every epoch) while the other GPUs wait."""
    if not context.is_distributed:
        return val_set
    start, stop = shard_bounds(len(val_set), context)
    return Subset(val_set, range(start, stop))


def parameter_groups(model: MCTformerV2, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases, norms, class tokens and position embedding (as DeiT)."""
    decay, no_decay = [], []
    skip = model.no_weight_decay()
    for name, parameter in model.named_parameters():
        (no_decay if parameter.ndim <= 1 or name in skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at_step(train: CamTrainConfig, step: int, epoch_steps: int, base_lr: float) -> float:
    """The lr of ``step`` under ``cam.train.lr_schedule`` (``weakclip_core.training.schedules``)."""
    if train.lr_schedule == "timm_epoch_cosine":
        return timm_epoch_cosine_lr(step, epoch_steps, train.epochs, base_lr, train.warmup_epochs, train.min_lr)
    return warmup_cosine_lr(step, train.epochs * epoch_steps, base_lr, train.warmup_epochs * epoch_steps,
                            train.min_lr)


def recorded_train(train: CamTrainConfig) -> dict[str, Any]:
    """``cam.train`` as the model file and the checkpoint key record it: ``lr_schedule`` only when set away from
    its default, so a default run's ``model.pt`` (a DVC output) keeps the bytes it had before the key existed."""
    return to_plain_without_defaults(train, (("lr_schedule",),))


def train_cam_model(params: Params, paths: CamTrainPaths = CamTrainPaths(), stop_after_steps: int | None = None,
                    show_progress: bool = True, context: DistributedContext | None = None) -> CamTrainResult | None:
    """Train (or resume) and write the final model; returns ``None`` when stopped early.

    ``stop_after_steps`` stops the process's loop after that many steps as if
    it were killed (nothing is written beyond the periodic checkpoints); the
    next call resumes from the last checkpoint. Under DDP (``context`` from
    torchrun) each rank trains on its slice of every global batch
    (``cam.train.batch_size``) and scores its share of val at each epoch's end; only rank 0 writes.
    """
    arch, train = params.cam.arch, params.cam.train
    if params.cam.source != "train":  # the CAMs are imported (or not used): nothing to train, say so
        reason = (f"not trained: cam.source is {params.cam.source!r}"
                  + {"npy_folder": " (cam_infer imports the CAMs from cam.npy_folder)",
                     "checkpoint": " (cam_infer runs the released checkpoint cam.checkpoint)"}.get(params.cam.source, ""))
        record_not_trained(paths.model, paths.live_dir, reason)
        return CamTrainResult(paths.model.parent / NOT_TRAINED_FILE, 0, math.nan, math.nan)
    dataset = PreparedDataset.open(params.dataset.prepared_dir)
    seed = params.runtime.seed
    set_threads(params.runtime.threads)
    seed_everything(seed)
    context = context or single_process_context(resolve_device(params.runtime.device))
    device = context.device
    n_foreground = dataset.n_classes - 1

    with params_key("cam.arch"):
        model = build_mctformer(arch, n_foreground)
    deit_weights = given_path(arch.pretrained)
    if deit_weights is not None:
        with params_key("cam.arch.pretrained"):
            load_deit_weights(model, deit_weights)
    model = model.to(device)
    base_lr = train.lr * train.batch_size / 512
    optimizer = torch.optim.AdamW(parameter_groups(model, train.weight_decay), lr=base_lr)

    train_set = ClassificationDataset(
        dataset, params.dataset.train_split, arch.image_size, seed=seed,
        augment=ClassificationAugment(arch.image_size, train.crop_scale_min, train.randaugment_ops,
                                      train.randaugment_magnitude, train.auto_augment, train.reprob))
    val_set = ClassificationDataset(dataset, params.dataset.val_split, arch.image_size,
                                    allow_unlabelled=True)  # val keeps unannotated images: negatives
    epoch_steps = steps_per_epoch(len(train_set), train.batch_size)
    total_steps = train.epochs * epoch_steps

    checkpointer = Checkpointer(STAGE, {
        "arch": to_plain(arch), "train": recorded_train(train), "seed": seed,
        # the DeiT init's bytes, not only its path (in arch): a file replaced at the same path between a killed run
        # and its re-run started from the old file's weights; absent without one, so those keys stay as they were
        **({"pretrained_sha256": sha256_of_file(deit_weights)} if deit_weights is not None else {}),
        "dataset": {"prepared_dir": params.dataset.prepared_dir, "train_split": params.dataset.train_split,
                    "val_split": params.dataset.val_split,  # its mAP is logged per epoch and recorded in the model
                    "labels_sha256": sha256_of_file(dataset.root / LABELS_FILE)},
    }, root=paths.checkpoint_root)
    start_step, extra = checkpointer.resume(model, optimizer)

    batch_sampler = EpochBatchSampler(len(train_set), train.batch_size, seed, total_steps, start_step)
    if context.is_distributed:  # each rank takes its slice of the global batch one process would take
        per_process_batch_size(train.batch_size, context, "cam.train.batch_size")
        last_batch = len(train_set) - (epoch_steps - 1) * train.batch_size
        if last_batch < context.world_size:
            raise ConfigError(f"cam.train.batch_size: the last batch of an epoch holds {last_batch} image(s), "
                              f"fewer than runtime.nproc = {context.world_size}; change the batch size")
        batch_sampler = ShardedBatchSampler(batch_sampler, context)
    loader = DataLoader(train_set, num_workers=train.workers, batch_sampler=batch_sampler,
                        generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(val_shard(val_set, context), batch_size=max(train.batch_size, 32),
                            num_workers=train.workers)
    trained_model = wrap_model(model, context)  # ``model`` itself alone; its DDP wrapper under torchrun

    live = (LiveLog(paths.live_dir, start_step, lambda done: (done - 1) // epoch_steps, extra.get(LIVE_HISTORY_KEY))
            if context.is_main else None)
    val_maps = (float(extra.get("val_map_class_token", 0.0)), float(extra.get("val_map_patch_cam", 0.0)))

    def compute_losses(step: int, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, labels = batch[0].to(device), batch[1].to(device)
        output = trained_model(images)
        loss = (F.multilabel_soft_margin_loss(output.class_logits, labels)
                + F.multilabel_soft_margin_loss(output.patch_logits, labels))
        if context.is_distributed:  # DDP's gradient average becomes the global batch's mean
            global_batch = min(train.batch_size, len(train_set) - (step % epoch_steps) * train.batch_size)
            loss = loss * shard_loss_weight(len(images), global_batch, context)
        return {"loss": loss}

    def end_of_epoch(window: WindowEnd) -> None:  # on every rank: each scores its share of val
        nonlocal val_maps
        val_maps = evaluate_map(model, val_loader, device, context)
        if live is not None:  # rank 0 logs
            live.log_window(window.done, window.mean_losses, window.lr,
                            {"val/map_class_token": val_maps[0], "val/map_patch_cam": val_maps[1]})

    result = run_training_loop(
        name=STAGE, lr_key="cam.train.lr",
        plan=LoopPlan(total_steps=total_steps, window_steps=epoch_steps, checkpoint_every=train.checkpoint_every,
                      lr_at=lambda step: lr_at_step(train, step, epoch_steps, base_lr)),
        batches=loader, start_step=start_step, model=model, optimizer=optimizer, compute_losses=compute_losses,
        context=context, checkpointer=checkpointer, state=LoopState.from_dict(extra.get("loop")),
        on_window_end=end_of_epoch,
        checkpoint_extra=lambda: {"val_map_class_token": val_maps[0], "val_map_patch_cam": val_maps[1],
                                  **(live.history() if live else {})},
        stop_after_steps=stop_after_steps, show_progress=show_progress)
    if not result.finished:
        return None

    def write_outputs() -> tuple[float, float]:
        # The init file is recorded only when one was given ("" for none, as before imports/none stood for it).
        recorded_arch = {**to_plain(arch), "pretrained": deit_weights or ""}
        save_final_model(paths.model, model.cpu(), config={"arch": recorded_arch, "n_classes": n_foreground},
                         class_names=dataset.class_names, dataset=dataset.name, steps=total_steps,
                         train=recorded_train(train), seed=seed, val_map_class_token=val_maps[0],
                         val_map_patch_cam=val_maps[1])
        assert live is not None
        live.end()
        checkpointer.clear()
        return val_maps

    val_maps = broadcast_from_main(run_on_main(context, write_outputs), context) or val_maps
    return CamTrainResult(paths.model, total_steps, val_maps[0], val_maps[1])


def run(params: Params, args: argparse.Namespace, context: DistributedContext) -> str | None:
    result = train_cam_model(params, context=context)
    assert result is not None
    if result.steps == 0:
        return f"{STAGE}: not trained (cam.source: {params.cam.source}) -> {result.model_path}"
    return (f"{STAGE}: {result.steps} steps, val mAP class-token {result.val_map_class_token:.3f}, "
            f"PatchCAM {result.val_map_patch_cam:.3f} -> {result.model_path}")


SPEC = StageSpec(name=STAGE, module="pipeline.cam_train", description=__doc__.splitlines()[0], run=run,
                 global_batches=lambda params: {"cam.train.batch_size": params.cam.train.batch_size})


def main(argv: list[str] | None = None) -> int | None:
    """Run the stage; with ``runtime.launcher: torchrun`` first relaunch it as ``runtime.nproc`` DDP workers."""
    return run_stage(SPEC, argv)


if __name__ == "__main__":
    run_stage_cli(main, STAGE)

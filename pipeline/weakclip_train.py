"""Stage ``weakclip_train``: train WeakCLIP on CAM seeds with the frozen CLIP (docs/METHOD.md §2).

Reads the CLIP artifact (``artifacts/clip``), the CAM store of the train split
(``artifacts/cams/train.h5``, checked against the dataset's classes and ids)
and the prepared train split. Seeds are made from the CAMs (``weakclip.seeds``:
confident thresholds, or dense argmax for the ablation), or, with ``weakclip.seeds.source: mask_folder``,
are the imported pseudo-mask PNGs (the CAM store is then not read; a GT folder is refused), or, with ``gt``, the
prepared GT masks (an upper bound, flagged ``gt_used`` in the metrics). Only the prompts,
pyramid adapter, co-attention and decoder train: AdamW, linear warm-up then
cosine to ``min_lr``, the paper's augmentations scaled to ``train.crop``; loss
= seed + boundary (KL to the dense CRF of P, CRF in a process pool started
once) + aux. Checkpoints every ``checkpoint_every`` steps; a killed run resumes
from the last one and, with data order and augmentation pure functions of
(seed, epoch, index), ends with the same weights on CPU.

Writes ``artifacts/weakclip/model.pt`` (learned parts + what rebuilds the
model), dvclive logs under ``dvclive/weakclip_train/`` and
``metrics/weakclip.json``: the train split predicted single-scale, without CRF,
restricted to each image's labels + background, scored against GT, beside the
mIoU of the seeds it trained on.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from weakclip_core.artifacts.atomic import sha256_of_file, write_json
from weakclip_core.artifacts.cam_store import CamStoreReader
from weakclip_core.models.clip import MODEL_CONFIG_FILE, load_clip_artifact
from weakclip_core.config import Params, to_plain
from weakclip_core.config.schema import ConfigError, given_path
from weakclip_core.method.crf import CrfPool
from weakclip_core.data.layout import IGNORE_INDEX, LABELS_FILE, PreparedDataset, read_image_size
from weakclip_core.data.sampling import StepSampler
from weakclip_core.data.imports import check_mask_classes_follow_labels, read_pseudo_mask
from weakclip_core.data.packed_masks import PackedMasks
from weakclip_core.data.seeded import SeededTrainingSet, build_seed_masks
from weakclip_core.data.segmentation import ground_truth_dirs, refuse_ground_truth_dir
from weakclip_core.data.transforms import MmsegAugmentation
from weakclip_core.runtime.device import autocast, resolve_device, seed_everything, set_threads
from weakclip_core.runtime.distributed import (DistributedContext, ShardedKeySampler, broadcast_from_main,
                                               per_process_batch_size, run_on_main, single_process_context,
                                               wrap_model)
from weakclip_core.method.inference import InferenceAugmentation
from weakclip_core.method.losses import weakclip_losses
from weakclip_core.evaluation.metrics import NOT_SCORED_NO_GT, ConfusionAccumulator
from weakclip_core.evaluation.split_score import score_argmax_on_split
from weakclip_core.models.weakclip.model import WeakCLIP
from weakclip_core.training.checkpoint import CHECKPOINT_ROOT, Checkpointer
from weakclip_core.training.loop import LoopPlan, LoopState, WindowEnd, run_training_loop
from weakclip_core.training.schedules import mmcv_cosine_lr, warmup_cosine_lr
from weakclip_core.artifacts.weakclip import clip_weights_sha256, save_weakclip_model, trainable_modules

from pipeline._stage import (LIVE_HISTORY_KEY, LiveLog, StageSpec, params_key, require_input, run_stage,
                             run_stage_cli)

STAGE = "weakclip_train"
LOG_EVERY = 10
EVAL_BATCH = 16


@dataclass(frozen=True)
class WeakClipTrainPaths:
    """What the stage reads and writes (dvc.yaml's deps and outs); tests point these into a temporary folder."""

    clip_dir: Path = Path("artifacts/clip")
    cam_store: Path = Path("artifacts/cams/train.h5")
    model: Path = Path("artifacts/weakclip/model.pt")
    metrics: Path = Path("metrics/weakclip.json")
    live_dir: Path = Path("dvclive/weakclip_train")
    checkpoint_root: Path = CHECKPOINT_ROOT


def imported_seed_masks(folder: Path, dataset: PreparedDataset, image_ids: list[str],
                        show_progress: bool, say_warnings: bool = True) -> PackedMasks:
    """``weakclip.seeds.source: mask_folder``: each train image's pseudo mask, checked before the first step
    (a missing one or one of the wrong size stops the stage naming the file; most masks showing classes their
    images are not labelled with stop it too, and a few such masks are said on stderr when ``say_warnings``:
    rank 0's job under torchrun)."""
    masks = PackedMasks()  # compressed: a whole split's masks as arrays took ~25 GB on COCO, in every DDP rank
    shown: dict[str, list[int]] = {}
    labels = {image_id: dataset.image_labels(image_id) for image_id in image_ids}
    for image_id in tqdm(image_ids, desc=f"{STAGE} masks", unit="mask", disable=not show_progress):
        masks[image_id], shown[image_id] = read_pseudo_mask(
            folder / f"{image_id}.png", read_image_size(dataset.image_path(image_id)), dataset.n_classes,
            labels[image_id])
    warning = check_mask_classes_follow_labels(shown, labels, folder)
    if warning is not None and say_warnings:
        print(f"{STAGE}: warning: {warning}", file=sys.stderr)
    return masks


def seed_mask_folder(params: Params, dataset: PreparedDataset, image_ids: list[str]) -> Path:
    """The folder of seed masks ``weakclip.seeds.source`` names.

    ``mask_folder``: the imported folder, refused when it is (or lies in) a GT mask folder, so a mistyped path
    never trains "weakly supervised" WeakCLIP on GT. ``gt``: the prepared GT masks, chosen on purpose (an upper
    bound); every train image needs one.
    """
    seeds = params.weakclip.seeds
    gt_dirs = ground_truth_dirs(dataset.root, given_path(params.dataset.source),
                                    given_path(params.dataset.coco_masks))
    if seeds.source == "mask_folder":
        refuse_ground_truth_dir(seeds.mask_folder, gt_dirs, "weakclip.seeds.mask_folder")
        return Path(seeds.mask_folder)
    without_gt = [image_id for image_id in image_ids if not dataset.has_mask(image_id)]
    if without_gt:
        raise ConfigError(f"weakclip.seeds.source: 'gt' trains on the GT masks, but {len(without_gt)} of the "
                          f"{len(image_ids)} train images have none (first: {without_gt[0]})")
    return gt_dirs[0]


def masks_fingerprint(folder: Path, image_ids: list[str]) -> str:
    """SHA-256 over the ids and bytes of the imported masks: new masks never resume a stale run."""
    digest = hashlib.sha256()
    for image_id in image_ids:
        digest.update(image_id.encode() + b"\0" + (folder / f"{image_id}.png").read_bytes())
    return digest.hexdigest()


def seed_quality(seed_masks: Mapping[str, np.ndarray], dataset: PreparedDataset, image_ids: list[str]) -> dict:
    """mIoU of the seeds vs GT on the pixels the seeds label, and the share of GT pixels they label."""
    accumulator = ConfusionAccumulator(dataset.n_classes)
    labelled = scored = 0
    if not any(dataset.has_mask(image_id) for image_id in image_ids):
        return {"seed_miou": None, "seed_coverage": None}  # label-only data: nothing to score against
    for image_id in image_ids:
        if not dataset.has_mask(image_id):
            continue
        ground_truth = dataset.checked_mask(image_id)
        seed_mask = seed_masks[image_id]
        unlabelled = seed_mask == IGNORE_INDEX
        scored += int((ground_truth != IGNORE_INDEX).sum())
        labelled += int(((ground_truth != IGNORE_INDEX) & ~unlabelled).sum())
        accumulator.add(np.where(unlabelled, IGNORE_INDEX, ground_truth), np.where(unlabelled, 0, seed_mask))
    return {"seed_miou": accumulator.report().miou, "seed_coverage": labelled / scored if scored else 0.0}


def precise_logits(model: WeakCLIP, images: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
    """``model(images).logits`` at ``runtime.precision``, as float32: fp32 is the plain call (no autocast)."""
    with autocast(device, precision):
        logits = model(images).logits
    return logits.float()


@torch.no_grad()
def evaluate_on_split(model: WeakCLIP, dataset: PreparedDataset, image_ids: list[str], crop: int,
                      device: torch.device, show_progress: bool = True,
                      img_scale: tuple[int, int] | None = None, precision: str = "fp32",
                      context: DistributedContext | None = None) -> tuple[dict, int]:
    """Single-scale (ratio 1 of ``img_scale``, or the image's size), no-CRF prediction restricted to labels
    + background, scored vs GT; (report dict, n scored). ``precision`` (``runtime.precision``): the forward's
    autocast; the logits come back as float32 either way (numpy has no bfloat16). ``context``: under torchrun
    every rank scores its share of ``image_ids`` and gets the whole split's report."""
    model.eval()
    tta = InferenceAugmentation(scales=(1.0,), flip=False, crop=crop, stride=max(1, 2 * crop // 3),
                                img_scale=img_scale)
    accumulator, n_scored = score_argmax_on_split(lambda images: precise_logits(model, images, device, precision),
                                                  dataset, image_ids, tta, restrict_to_labels=True, device=device,
                                                  batch_size=EVAL_BATCH,
                                                  progress=f"{STAGE} eval" if show_progress else None,
                                                  context=context)
    return accumulator.report().as_dict(dataset.class_names), n_scored


def train_weakclip(params: Params, paths: WeakClipTrainPaths = WeakClipTrainPaths(),
                   stop_after_steps: int | None = None, show_progress: bool = True,
                   context: DistributedContext | None = None) -> dict[str, Any] | None:
    """Train (or resume), write the model and the metrics; returns the metrics, or ``None`` when stopped early.

    ``stop_after_steps`` stops this call after that many steps as if the process
    were killed (only the periodic checkpoints are written); the next call resumes.
    Under DDP (``context`` from torchrun) each rank trains on its slice of every
    global batch (``weakclip.train.batch_size``); the frozen CLIP stays out of DDP
    (each rank loads it from the artifact); the losses are per-shard means that
    DDP averages; every rank scores its share of the split after training, and only rank 0 writes.
    """
    cfg, train = params.weakclip, params.weakclip.train
    seed = params.runtime.seed + train.seed_offset  # the offset: this stage's own noise (bench.ablations --seeds)
    set_threads(params.runtime.threads)
    context = context or single_process_context(resolve_device(params.runtime.device))
    device = context.device
    show_progress = show_progress and context.is_main
    dataset = PreparedDataset.open(params.dataset.prepared_dir)
    image_ids = dataset.split(params.dataset.train_split)
    scored_ids = dataset.scored_ids(params.dataset.train_split, params.dataset.scored_split)
    if cfg.seeds.source in ("mask_folder", "gt"):  # a folder of masks: the seeds as they are (the reference's input)
        mask_folder = seed_mask_folder(params, dataset, image_ids)
        seed_masks = imported_seed_masks(mask_folder, dataset, image_ids, show_progress, context.is_main)
        seeds_key = {"masks_sha256": masks_fingerprint(mask_folder, image_ids)}
        cam_variant = None
    else:
        store = CamStoreReader(require_input(paths.cam_store, "cam_infer"))
        seed_masks = build_seed_masks(store, dataset, image_ids, cfg.seeds, progress=show_progress)
        store.close()
        seeds_key = {"cams_sha256": sha256_of_file(paths.cam_store)}
        cam_variant = store.params.get("cam_infer", {}).get("variant")
    seeds = seed_quality(seed_masks, dataset, scored_ids)  # before training: a broken GT mask stops it here

    seed_everything(seed)
    clip = load_clip_artifact(require_input(paths.clip_dir, "clip"))
    with params_key("weakclip"):  # prompt and context lengths, taps: the model's terms, our keys
        model = WeakCLIP(clip, dataset.class_names, cfg.arch(), prompt_init_std=train.prompt_init_std,
                         clip_drop_path_rate=train.clip_drop_path_rate,
                         clip_drop_path_unit=train.clip_drop_path_unit, decoder_init=train.decoder_init).to(device)
    learned = trainable_modules(model)
    # fused: one kernel for the whole update, ~3x faster than the per-tensor loop on CPU at the same results to
    # float rounding (docs/BENCHMARKS.md, "Where a training step's time goes"; tests/test_step_profile.py)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=train.lr, weight_decay=train.weight_decay,
                                  fused=True)
    checkpointer = Checkpointer(STAGE, {
        "weakclip": to_plain(cfg), "seed": seed, "clip_sha256": clip_weights_sha256(paths.clip_dir),
        # the CLIP's architecture too: ViT-B-16 and ViT-B-16-quickgelu store the same weight bytes
        "clip_config_sha256": sha256_of_file(paths.clip_dir / MODEL_CONFIG_FILE),
        **seeds_key,
        # a bf16 run never resumes an fp32 one (or back); absent at fp32, so fp32 checkpoints keep their key
        **({"precision": params.runtime.precision} if params.runtime.precision != "fp32" else {}),
        "dataset": {"prepared_dir": params.dataset.prepared_dir, "train_split": params.dataset.train_split,
                    "labels_sha256": sha256_of_file(dataset.root / LABELS_FILE)},
    }, root=paths.checkpoint_root)
    start_step, extra = checkpointer.resume(learned, optimizer)

    img_scale = (train.img_scale[0], train.img_scale[1]) if train.img_scale else None
    augmentation = MmsegAugmentation(crop=train.crop, ratio_min=train.scale_min, ratio_max=train.scale_max,
                                     img_scale=img_scale, cat_max_ratio=train.cat_max_ratio,
                                     hue_delta=train.hue_delta)
    training_set = SeededTrainingSet(dataset, image_ids, seed_masks, augmentation, seed)
    with params_key("weakclip.train.batch_size"):  # a batch larger than the training set: one line naming the key
        sampler = StepSampler(len(training_set), train.batch_size, seed, train.iterations, start_step)
    loader = DataLoader(training_set, num_workers=train.workers,
                        batch_size=per_process_batch_size(train.batch_size, context, "weakclip.train.batch_size"),
                        sampler=ShardedKeySampler(sampler, train.batch_size, context) if context.is_distributed
                        else sampler,
                        generator=torch.Generator().manual_seed(seed))
    trained_model = wrap_model(model, context, frozen_prefixes=("clip.",))  # DDP over the learned parts only
    live = LiveLog(paths.live_dir, start_step, lambda done: done, extra.get(LIVE_HISTORY_KEY)) if context.is_main else None
    train_started = time.perf_counter()
    crf_workers = cfg.loss.crf_workers if cfg.loss.boundary_weight > 0 else 0  # no boundary loss: no CRF to run
    with CrfPool(cfg.loss.crf, crf_workers) as crf_pool:

        def compute_losses(step: int, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            output = trained_model(batch["image"].to(device))
            losses = weakclip_losses(output.logits, output.matching, batch["seed_mask"].to(device),
                                     batch["raw_image"].to(device), cfg.loss, crf_pool)
            return {"loss": losses.total, "seed_loss": losses.seed, "boundary_loss": losses.boundary,
                    "aux_loss": losses.aux}

        def end_of_window(window: WindowEnd) -> None:
            if live is not None:  # rank 0 logs
                live.log_window(window.done, window.mean_losses, window.lr)

        result = run_training_loop(
            name=STAGE, lr_key="weakclip.train.lr",
            plan=LoopPlan(total_steps=train.iterations, window_steps=LOG_EVERY,
                          checkpoint_every=train.checkpoint_every, checkpoint_at_window_end=False,
                          checkpoint_final=False,
                          lr_at=lambda step: (mmcv_cosine_lr if train.lr_schedule == "mmcv_cosine"
                                              else warmup_cosine_lr)(step, train.iterations, train.lr,
                                                                     train.warmup_iterations, train.min_lr)),
            batches=loader, start_step=start_step, model=model, optimizer=optimizer,
            compute_losses=compute_losses, context=context, checkpointer=checkpointer,
            checkpointed_module=learned, state=LoopState.from_dict(extra.get("loop")),
            on_window_end=end_of_window, stop_after_steps=stop_after_steps, show_progress=show_progress,
            precision=params.runtime.precision, checkpoint_extra=lambda: live.history() if live else {})
    if not result.finished:
        return None
    seconds_per_step = (time.perf_counter() - train_started) / max(1, result.steps_this_run)
    if context.is_main:
        save_weakclip_model(paths.model, model.cpu(), cfg, paths.clip_dir, dataset=dataset.name,
                            steps=train.iterations, seed=seed, seed_mode=cfg.seeds.mode)
    # Every rank scores its share of the split (the ranks hold the same weights); rank 0 writes.
    report, n_scored = evaluate_on_split(model.to(device), dataset, scored_ids, train.crop, device, show_progress,
                                         img_scale, params.runtime.precision, context)
    if not context.is_main:  # rank 0 writes; the others wait for its metrics
        return broadcast_from_main(run_on_main(context, dict), context)
    if n_scored == 0:  # label-only data: trained all the same; the figures say why there are none
        report = {"miou": None, **{key: None for key in ("pixel_accuracy", "per_class", "precision", "recall")}}
    metrics = {
        "miou": report["miou"],
        **({"not_scored": NOT_SCORED_NO_GT} if n_scored == 0 else {}),
        "split": params.dataset.scored_split,
        "n_images": n_scored,
        "inference": "single scale, no CRF, restricted to image labels + background",
        "seed_mode": cfg.seeds.mode,
        "fg_threshold": cfg.seeds.fg_threshold,
        "bg_threshold": cfg.seeds.bg_threshold,
        "thresholds_chosen_with_gt": cfg.seeds.chosen_with_gt,
        "cam_variant": cam_variant,
        **({"seeds_source": cfg.seeds.source} if cfg.seeds.source != "cams" else {}),  # CAM seeds: as before
        **({"gt_used": True} if cfg.seeds.source == "gt" else {}),  # the flag pseudo_masks carries downstream
        **seeds,
        "steps": train.iterations,
        **{key: report[key] for key in ("pixel_accuracy", "per_class", "precision", "recall")},
    }
    write_json(paths.metrics, metrics)
    assert live is not None
    live.log_summary({name: value for name, value in (("train_miou", metrics["miou"]),
                                                      ("seed_miou", metrics["seed_miou"])) if value is not None})
    live.end()
    checkpointer.clear()
    print(f"{STAGE}: {result.steps_this_run} steps this run at {seconds_per_step:.3f} s/step")
    return broadcast_from_main(run_on_main(context, lambda: metrics), context)


def run(params: Params, args: argparse.Namespace, context: DistributedContext) -> str | None:
    metrics = train_weakclip(params, context=context)
    assert metrics is not None
    if metrics["miou"] is None:
        return f"{STAGE}: trained {metrics['steps']} steps; {metrics['split']}: {metrics['not_scored']}"
    return (f"{STAGE}: {metrics['split']} mIoU {metrics['miou']:.3f} over {metrics['n_images']} images "
            f"(seeds {metrics['seed_mode']}: mIoU {metrics['seed_miou']:.3f} on {metrics['seed_coverage']:.0%} "
            f"of the pixels), {metrics['steps']} steps")


SPEC = StageSpec(name=STAGE, module="pipeline.weakclip_train", description=__doc__.splitlines()[0], run=run,
                 global_batches=lambda params: {"weakclip.train.batch_size": params.weakclip.train.batch_size})


def main(argv: list[str] | None = None) -> int | None:
    """Run the stage; with ``runtime.launcher: torchrun`` first relaunch it as ``runtime.nproc`` DDP workers."""
    return run_stage(SPEC, argv)


if __name__ == "__main__":
    run_stage_cli(main, STAGE)

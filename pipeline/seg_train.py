"""Stage ``seg_train@{pseudo,gt}``: retrain a fully-supervised segmenter on pseudo masks or on GT (docs/METHOD.md §4).

``--source pseudo`` reads ``pseudo.output_dir`` (refused when it resolves to a GT folder); ``--source gt``
reads the prepared ``SegmentationClass``: the same trainer gives the fully-supervised upper bound.
smp DeepLabV3+ or SegFormer, or DeepLabV2 (the presets'), per ``seg.model``; AdamW (default) or SGD
momentum + poly (the paper's DeepLab recipe); random resize / crop / flip / photometric augmentation,
deterministic per (seed, epoch, index); cross-entropy with 255 ignored. Checkpoints every
``checkpoint_every`` steps and at each epoch end (stage ``seg_train_<source>``, keyed by the config and a
fingerprint of the masks); a killed run resumes there. Writes ``artifacts/seg/<source>/model.pt`` and dvclive
logs in ``dvclive/seg_train_<source>``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from weakclip_core.artifacts.atomic import sha256_of_file
from weakclip_core.config import Params
from weakclip_core.config.schema import given_path
from weakclip_core.data.layout import IGNORE_INDEX, DatasetError, PreparedDataset, read_checked_mask, read_image_size
from weakclip_core.data.sampling import StepSampler
from weakclip_core.data.segmentation import MaskedImageDataset, ground_truth_dirs, refuse_ground_truth_dir
from weakclip_core.data.transforms import DenseAugmentation
from weakclip_core.runtime.device import resolve_device, seed_everything, set_threads
from weakclip_core.runtime.distributed import (DistributedContext, ShardedKeySampler, all_reduce_sum,
                                               per_process_batch_size, run_on_main, single_process_context,
                                               wrap_model)
from weakclip_core.models.segmenter import (SEGMENTER_MEAN, SEGMENTER_STD, build_segmenter,
                                            parameter_groups, segmenter_record, training_config)
from weakclip_core.artifacts.model_file import save_final_model
from weakclip_core.training.checkpoint import CHECKPOINT_ROOT, Checkpointer
from weakclip_core.training.loop import LoopPlan, LoopState, WindowEnd, run_training_loop
from weakclip_core.training.schedules import poly_lr, warmup_cosine_lr

from pipeline._stage import (LIVE_HISTORY_KEY, LiveLog, StageSpec, params_key, record_not_trained, require_input, run_stage,
                             run_stage_cli)

Source = Literal["pseudo", "gt"]
SOURCES: tuple[str, ...] = ("pseudo", "gt")
PROVENANCE_FILE = "provenance.json"


@dataclass(frozen=True)
class SegTrainPaths:
    """Where the stage writes (dvc.yaml's outs); tests point these into a temporary folder."""

    model_root: Path = Path("artifacts/seg")
    live_root: Path = Path("dvclive")
    checkpoint_root: Path = CHECKPOINT_ROOT

    def model(self, source: str) -> Path:
        return self.model_root / source / "model.pt"

    def live_dir(self, source: str) -> Path:
        return self.live_root / f"seg_train_{source}"


@dataclass(frozen=True)
class SegTrainResult:
    model_path: Path
    steps: int
    final_loss: float


def mask_dir_of(params: Params, source: str) -> Path:
    """The mask folder of ``source``; a pseudo folder that resolves to a GT folder is refused."""
    dataset = PreparedDataset.open(params.dataset.prepared_dir)
    if source == "gt":
        return dataset.root / "SegmentationClass"
    if source == "pseudo":
        gt_dirs = ground_truth_dirs(dataset.root, given_path(params.dataset.source),
                                    given_path(params.dataset.coco_masks))
        refuse_ground_truth_dir(params.pseudo.output_dir, gt_dirs, "pseudo.output_dir")
        return require_input(params.pseudo.output_dir, "pseudo_masks")
    raise ValueError(f"--source: expected one of {list(SOURCES)}, got {source!r}")


def mask_fingerprint(mask_dir: Path, image_ids: list[str]) -> str:
    """SHA-256 over the ids and bytes of the masks a run trains on: new masks never resume a stale run."""
    digest = hashlib.sha256()
    for image_id in image_ids:
        digest.update(image_id.encode())
        digest.update((mask_dir / f"{image_id}.png").read_bytes())
    return digest.hexdigest()


def check_training_masks(dataset: PreparedDataset, mask_dir: Path, image_ids: list[str],
                         show_progress: bool = True) -> None:
    """Read every training mask once before the first step: a mask of the wrong size or with a class id
    outside 0..K-1 (255 ignore) stops the stage naming the file and the id, not ``cross_entropy`` mid-run."""
    for image_id in tqdm(image_ids, desc="checking masks", unit="mask", disable=not show_progress):
        read_checked_mask(mask_dir / f"{image_id}.png", read_image_size(dataset.image_path(image_id)),
                          dataset.n_classes)


def mask_provenance(mask_dir: Path, source: str) -> dict[str, Any]:
    """What the masks' maker recorded about GT use; GT masks are GT by definition."""
    if source == "gt":
        return {"masks": "ground truth", "gt_used": True, "threshold_chosen_with_gt": False}
    path = mask_dir / PROVENANCE_FILE
    if not path.is_file():
        raise DatasetError(f"{path}: missing; pseudo masks must come from the pseudo_masks stage "
                           "(it records whether GT chose any threshold upstream)")
    return json.loads(path.read_text())


def make_optimizer(model: torch.nn.Module, params: Params) -> torch.optim.Optimizer:
    train = params.seg.train
    groups = parameter_groups(model, train.head_lr_mult)  # head at lr * head_lr_mult (DeepLabV2: 10)
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    return torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay)


def learning_rate(params: Params, step: int, total_steps: int) -> float:
    train = params.seg.train
    if train.schedule == "poly":
        return poly_lr(step, total_steps, train.lr)
    return warmup_cosine_lr(step, total_steps, train.lr, warmup_steps=0)


def write_not_trained(model_path: Path, live_dir: Path, split: str) -> SegTrainResult:
    """``seg_train@gt`` on a train split without any GT mask: no model, a record saying why
    (``<model folder>/not_trained.json``, which ``seg_eval@gt`` reads) and a dvclive summary saying the same."""
    return SegTrainResult(record_not_trained(model_path, live_dir,
                                             f"not trained: no GT (split {split!r} has no GT mask)"), 0, math.nan)


def train_segmenter(params: Params, source: str, paths: SegTrainPaths = SegTrainPaths(),
                    stop_after_steps: int | None = None, show_progress: bool = True,
                    context: DistributedContext | None = None) -> SegTrainResult | None:
    """Train (or resume) on ``source`` masks and write the final model; ``None`` when stopped early.

    ``stop_after_steps`` ends this call after that many steps as if it were killed; the next call
    resumes from the last checkpoint. Under DDP (``context`` from torchrun) each rank trains on its
    slice of every global batch (``seg.train.batch_size``) with cross-process batch norm and the
    cross-entropy normalised by the global count of labelled pixels, so the step is the one a single
    process takes on the whole batch; only rank 0 writes.
    """
    seg, train = params.seg, params.seg.train
    dataset = PreparedDataset.open(params.dataset.prepared_dir)
    mask_dir = mask_dir_of(params, source)
    image_ids = dataset.split(params.dataset.train_split)
    if source == "gt":  # label-only data: the upper bound trains on the images that have a GT mask, if any
        image_ids = [image_id for image_id in image_ids if dataset.has_mask(image_id)]
        if not image_ids:
            return write_not_trained(paths.model(source), paths.live_dir(source), params.dataset.train_split)
    seed = params.runtime.seed
    set_threads(params.runtime.threads)
    seed_everything(seed)
    context = context or single_process_context(resolve_device(params.runtime.device))
    device = context.device

    train_set = MaskedImageDataset(dataset, image_ids, mask_dir,
                                   DenseAugmentation(train.crop, train.scale_min, train.scale_max),
                                   seed, SEGMENTER_MEAN, SEGMENTER_STD)
    check_training_masks(dataset, mask_dir, image_ids, show_progress)
    provenance = mask_provenance(mask_dir, source)
    with params_key("seg.encoder_weights"):
        model = build_segmenter(seg, dataset.n_classes).to(device)
    optimizer = make_optimizer(model, params)
    steps_per_epoch = len(train_set) // train.batch_size
    if steps_per_epoch == 0:
        raise DatasetError(f"{params.dataset.train_split}: {len(train_set)} images, fewer than one batch of "
                           f"{train.batch_size} (lower seg.train.batch_size)")
    total_steps = train.epochs * steps_per_epoch

    encoder_weights = given_path(seg.encoder_weights)
    checkpointer = Checkpointer(f"seg_train_{source}", {
        "seg": training_config(seg), "seed": seed, "source": source,
        "dataset": {"prepared_dir": params.dataset.prepared_dir, "train_split": params.dataset.train_split},
        "masks_sha256": mask_fingerprint(mask_dir, image_ids),
        # the encoder init's bytes, not only its path (in seg): a file replaced at the same path between a killed
        # run and its re-run started from the old file's weights; absent without one, so those keys stay as they were
        **({"encoder_weights_sha256": sha256_of_file(encoder_weights)} if encoder_weights is not None else {}),
    }, root=paths.checkpoint_root)
    start_step, extra = checkpointer.resume(model, optimizer)

    sampler = StepSampler(len(train_set), train.batch_size, seed, total_steps, start_step)
    local_batch = per_process_batch_size(train.batch_size, context, "seg.train.batch_size")
    loader = DataLoader(train_set, batch_size=local_batch, num_workers=train.workers,
                        sampler=ShardedKeySampler(sampler, train.batch_size, context) if context.is_distributed
                        else sampler,
                        generator=torch.Generator().manual_seed(seed))  # the loader's own seed draw leaves
    # the global RNG (dropout, drop-path) untouched, so a resumed run continues its exact stream
    trained_model = wrap_model(model, context)  # ``model`` itself alone; DDP with cross-process BN under torchrun
    live = (LiveLog(paths.live_dir(source), start_step, lambda done: (done - 1) // steps_per_epoch,
                    extra.get(LIVE_HISTORY_KEY))
            if context.is_main else None)

    def compute_losses(step: int, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = trained_model(batch[0].to(device))
        masks = batch[1].to(device)
        if context.is_distributed:  # sum over this shard / labelled pixels of the global batch, times W:
            # DDP's average over ranks is then the mean over the global batch's labelled pixels
            labelled = all_reduce_sum((masks != IGNORE_INDEX).sum().to(logits.dtype), context)
            return {"loss": F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="sum")
                    * (context.world_size / labelled)}
        return {"loss": F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)}

    def end_of_epoch(window: WindowEnd) -> None:
        if live is not None:  # rank 0 logs
            live.log_window(window.done, window.mean_losses, window.lr)

    result = run_training_loop(
        name=f"seg_train@{source}", lr_key="seg.train.lr",
        plan=LoopPlan(total_steps=total_steps, window_steps=steps_per_epoch, checkpoint_every=train.checkpoint_every,
                      lr_at=lambda step: learning_rate(params, step, total_steps)),
        batches=loader, start_step=start_step, model=model, optimizer=optimizer, compute_losses=compute_losses,
        context=context, checkpointer=checkpointer, state=LoopState.from_dict(extra.get("loop")),
        on_window_end=end_of_epoch, stop_after_steps=stop_after_steps, show_progress=show_progress,
        checkpoint_extra=lambda: live.history() if live else {})
    if not result.finished:
        return None
    last_loss = result.last_losses.get("loss", math.nan)

    model_path = paths.model(source)

    def write_outputs() -> None:
        save_final_model(model_path, model.cpu(), config=segmenter_record(seg, dataset.class_names),
                         source=source, dataset=dataset.name, train_split=params.dataset.train_split,
                         steps=total_steps, seed=seed, final_loss=last_loss, mask_provenance=provenance)
        assert live is not None
        live.end()
        checkpointer.clear()

    run_on_main(context, write_outputs)
    return SegTrainResult(model_path, total_steps, last_loss)


def run(params: Params, args: argparse.Namespace, context: DistributedContext) -> str | None:
    result = train_segmenter(params, args.source, context=context)
    assert result is not None
    if result.steps == 0:
        return f"seg_train@{args.source}: not trained, {params.dataset.train_split!r} has no GT mask -> {result.model_path}"
    return f"seg_train@{args.source}: {result.steps} steps, last loss {result.final_loss:.4f} -> {result.model_path}"


SPEC = StageSpec(
    name="seg_train", module="pipeline.seg_train", description=__doc__.splitlines()[0], run=run,
    add_arguments=lambda parser: parser.add_argument("--source", choices=SOURCES, required=True,
                                                     help="train on pseudo masks or on GT masks"),
    global_batches=lambda params: {"seg.train.batch_size": params.seg.train.batch_size},
    label=lambda args: f"seg_train@{args.source}")


def main(argv: list[str] | None = None) -> int | None:
    """Run the stage; with ``runtime.launcher: torchrun`` first relaunch it as ``runtime.nproc`` DDP workers."""
    return run_stage(SPEC, argv)


if __name__ == "__main__":
    run_stage_cli(main, "seg_train")

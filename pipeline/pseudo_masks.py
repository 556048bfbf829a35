"""Stage ``pseudo_masks``: WeakCLIP pseudo masks of the train split, refined by dense CRF (docs/METHOD.md §3).

1. Inference at ``pseudo.scales`` of the ``pseudo.img_scale`` base, each with horizontal flip (sliding
   ``crop``/``stride`` windows; smaller images run as is, or padded with ``pad_small_windows``), softmax
   probabilities averaged at the image size and restricted to the image's labels + background
   (``softmax_classes: all``: over every class, the CRF then on the argmax's classes, as the reference)
   (``weakclip_core.method.inference``); ``batch_size`` images at a time, at most ``batch_size``
   windows per model call.
2. Dense CRF (``pseudo.crf``) on those classes only, in ``pseudo.workers`` spawned processes: the jobs of
   a batch are submitted as soon as its probabilities exist, so the model's forward and the CRF overlap.
   A labelled class left with no pixel is boosted and the CRF run again (``pseudo.absent_class_odds_ratio``,
   ``weakclip_core.method.absent_classes``; 0 = off), so every mask agrees with its image's labels where it can.
   That per-image computation is ``weakclip_core.method.refine.refine_probabilities``; this stage writes
   what it returns.
3. Masks are written (atomically) into a work folder outside DVC's outputs,
   ``checkpoints/pseudo_masks/<config hash>/`` (DVC deletes declared outputs before it re-runs a stage):
   ``masks/<id>.png`` after CRF and repair, ``raw/<id>.png`` the plain argmax, and an append-only manifest per
   shard (``manifest-<i>-of-<n>.jsonl``, one ``{"id", "mask_sha256", "raw_sha256", "absent_before_repair",
   "absent_after_repair"}`` line per image: checksums and how many labelled classes had no pixel; flushed and
   fsynced). A killed run resumes: an image is done only when both PNGs exist and hash to the manifest's
   checksums; anything else is recomputed.
4. ``--shard i/n`` processes batches i, i+n, i+2n, ... of the sorted train ids cut into ``batch_size``
   chunks (whole batches, so every image is predicted in exactly the batch it has in an unsharded run and
   the bytes are the same); shards may run at once into the same work folder. ``--merge`` (or any
   unsharded run, which skips what is done) assembles the outputs once every image is done.
5. Assembly copies the masks into ``pseudo.output_dir`` (whole folder replaced atomically, plus
   ``provenance.json``), scores the raw and the final masks against GT on ``dataset.score_split`` (default
   the train split; each GT mask checked for size and class range) (``metrics/pseudo.json``) and
   draws overlays of a fixed sample and the worst images into ``reports/pseudo/``; then the work folder
   is removed.

Guards: an output folder that resolves to a GT folder, holds anything this stage does not write, or is or
contains a folder the stage reads (the prepared dataset, the source, the model, the project) stops the stage
before any work (``check_output_folders``); the GT-use flags
of the upstream seeds are read from ``metrics/weakclip.json`` (a missing flag stops the stage rather
than report "no GT used").
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from weakclip_core.artifacts.atomic import (FolderContents, atomic_dir, check_output_dir, remove_stale_temporaries,
                                           sha256_of_file, write_json)
from weakclip_core.config import ConfigError, Params, to_plain
from weakclip_core.config.schema import given_path
from weakclip_core.config.weakclip import CrfConfig
from weakclip_core.data.layout import LABELS_FILE, PreparedDataset, read_mask, write_mask
from weakclip_core.data.segmentation import ground_truth_dirs, refuse_ground_truth_dir
from weakclip_core.runtime.device import autocast, resolve_device, set_threads
from weakclip_core.method.inference import DenseModel, InferenceAugmentation, predict_reduced_batch
from weakclip_core.method.prediction_crf import shown_classes_on_device
from weakclip_core.method.refine import refine_probabilities
from weakclip_core.evaluation.metrics import NOT_SCORED_NO_GT, ConfusionAccumulator, confusion_matrix, image_miou
from weakclip_core.evaluation.overlays import evenly_spaced, lowest_scoring, save_overlay
from weakclip_core.training.checkpoint import CHECKPOINT_ROOT, config_hash
from weakclip_core.artifacts.weakclip import WeakClipArtifactError, load_weakclip_model
from weakclip_core.models.clip import WEIGHTS_FILE
from weakclip_core.runtime.processes import die_with_parent

from pipeline._locks import shard_locks
from pipeline._stage import StageSpec, require_input, run_stage, run_stage_cli

STAGE = "pseudo_masks"
PROVENANCE_FILE = "provenance.json"
N_WORST = 8
SEEDS_GT_FLAG = "thresholds_chosen_with_gt"
MANIFEST_KEYS = {"id", "mask_sha256", "raw_sha256", "absent_before_repair", "absent_after_repair"}
# All the stage writes into its two output folders (each replaced whole): anything else there is refused.
MASK_FOLDER_CONTENTS = FolderContents(files=("*.png", PROVENANCE_FILE))
REPORT_CONTENTS = FolderContents(files=("*.png",))


class ProvenanceError(ValueError):
    """The GT use upstream cannot be established, or would be misreported; names the file and key."""


@dataclass(frozen=True)
class PseudoPaths:
    """What the stage reads and writes besides ``pseudo.output_dir``; tests point these into a temp folder."""

    model: Path = Path("artifacts/weakclip/model.pt")
    clip_dir: Path | None = None  # None: the CLIP artifact recorded in the model file
    weakclip_metrics: Path = Path("metrics/weakclip.json")
    metrics: Path = Path("metrics/pseudo.json")
    reports: Path = Path("reports/pseudo")
    work_root: Path = CHECKPOINT_ROOT / STAGE


@dataclass(frozen=True)
class Shard:
    """Batches ``index``, ``index + count``, ... of the sorted ids (``0/1``: everything)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        try:
            index_text, count_text = text.split("/")
            shard = cls(int(index_text), int(count_text))
        except ValueError:
            raise ValueError(f"--shard: expected i/n with 0 <= i < n, got {text!r}") from None
        if not 0 <= shard.index < shard.count:
            raise ValueError(f"--shard: expected i/n with 0 <= i < n, got {text!r}")
        return shard

    @property
    def manifest_name(self) -> str:
        return f"manifest-{self.index}-of-{self.count}.jsonl"


# --------------------------------------------------------------------------- work folder and manifest

def work_config(params: Params, dataset: PreparedDataset, model_path: Path) -> dict[str, Any]:
    """Everything that changes a mask's bytes (not where outputs go, nor how many CRF workers run).

    ``runtime.precision`` is in it only when not fp32, so an fp32 run's work folder keeps its name."""
    pseudo = to_plain(params.pseudo)
    for key in ("output_dir", "workers", "overlay_samples"):
        pseudo.pop(key)
    precision = params.runtime.precision
    return {"pseudo": pseudo, "model_sha256": sha256_of_file(model_path),
            **({"precision": precision} if precision != "fp32" else {}),
            "dataset": {"root": str(dataset.root.resolve()), "split": params.dataset.train_split,
                        "labels_sha256": sha256_of_file(dataset.root / LABELS_FILE)}}


def work_dir_of(paths: PseudoPaths, config: dict[str, Any]) -> Path:
    return paths.work_root / config_hash(config)


def read_manifest_lines(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of one manifest; a torn last line (a kill mid-write) is dropped."""
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and MANIFEST_KEYS <= set(entry):
            entries.append(entry)
    return entries


def done_images(work_dir: Path) -> dict[str, dict[str, Any]]:
    """Images whose two PNGs exist and match a manifest checksum (any shard's manifest)."""
    claimed: dict[str, dict[str, Any]] = {}
    for manifest in sorted(work_dir.glob("manifest-*.jsonl")):
        for entry in read_manifest_lines(manifest):
            claimed[entry["id"]] = entry
    done = {}
    for image_id, entry in claimed.items():
        mask_path, raw_path = work_dir / "masks" / f"{image_id}.png", work_dir / "raw" / f"{image_id}.png"
        if (mask_path.is_file() and raw_path.is_file() and sha256_of_file(mask_path) == entry["mask_sha256"]
                and sha256_of_file(raw_path) == entry["raw_sha256"]):
            done[image_id] = entry
    return done


class ManifestWriter:
    """Appends one line per finished image to this shard's manifest, durably (flush + fsync)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            text = path.read_text()
            if text and not text.endswith("\n"):  # a torn line from a kill: cut it before appending
                with open(path, "r+") as stream:
                    stream.truncate(text.rfind("\n") + 1)
        self._stream = open(path, "a")

    def add(self, entry: dict[str, Any]) -> None:
        self._stream.write(json.dumps(entry, sort_keys=True) + "\n")
        self._stream.flush()
        os.fsync(self._stream.fileno())

    def close(self) -> None:
        self._stream.close()


def remove_killed_writers_temporaries(params: Params, paths: PseudoPaths, work_dir: Path) -> None:
    """Delete what a killed run of this stage left under temporary names: PNGs in the work folder and the
    half-built output folders / metrics beside their final names. Only the atomic writers' own temporary
    names whose writer process is gone are removed (``weakclip_core.artifacts.atomic.remove_stale_temporaries``), so a
    shard running at the same time keeps its files."""
    for folder in (work_dir / "masks", work_dir / "raw"):
        remove_stale_temporaries(folder)
    for output in (Path(params.pseudo.output_dir), paths.reports, paths.metrics):
        remove_stale_temporaries(output.parent, output.name)


def check_output_folders(params: Params, paths: PseudoPaths) -> None:
    """Before any work: ``OutputFolderError`` for an output folder whose replacement would delete something the
    stage does not write (an input, the project, a foreign file; ``weakclip_core.artifacts.atomic``)."""
    reads = {"dataset.prepared_dir": params.dataset.prepared_dir, "dataset.source": given_path(params.dataset.source),
             "weakclip.seeds.mask_folder": given_path(params.weakclip.seeds.mask_folder),
             "the WeakCLIP model": paths.model, "the CLIP artifact": paths.clip_dir,
             "weakclip_train's metrics": paths.weakclip_metrics, "the work folder": paths.work_root}
    check_output_dir(params.pseudo.output_dir, MASK_FOLDER_CONTENTS, key="pseudo.output_dir", reads=reads)
    check_output_dir(paths.reports, REPORT_CONTENTS, reads=reads)


# --------------------------------------------------------------------------- the CRF worker job

@dataclass(frozen=True)
class RefineJob:
    """One image's CRF job, pickled to a worker: its probabilities over its ``classes`` only ((n, H, W), rows in
    ``classes`` order), the refinement settings, and where its two PNGs go."""

    image_id: str
    image: np.ndarray
    probabilities: np.ndarray
    classes: tuple[int, ...]
    crf: CrfConfig | None
    absent_class_odds_ratio: float  # 0: no absent-class repair
    work_dir: Path


def refine_and_write(job: RefineJob) -> dict[str, Any]:
    """Refine one image (``weakclip_core.method.refine``) and write its raw and final masks atomically.

    Runs in a CRF worker process. Returns the manifest entry: both PNGs' checksums and how many labelled
    classes had no pixel before and after the absent-class repair.
    """
    refined = refine_probabilities(job.image, job.probabilities, job.classes, job.crf, job.absent_class_odds_ratio)
    raw_path = job.work_dir / "raw" / f"{job.image_id}.png"
    mask_path = job.work_dir / "masks" / f"{job.image_id}.png"
    write_mask(raw_path, refined.raw)
    write_mask(mask_path, refined.final)
    return {"id": job.image_id, "mask_sha256": sha256_of_file(mask_path), "raw_sha256": sha256_of_file(raw_path),
            "absent_before_repair": len(refined.absent_before_repair),
            "absent_after_repair": len(refined.absent_after_repair)}


# --------------------------------------------------------------------------- inference over a shard

def id_batches(image_ids: list[str], batch_size: int) -> list[list[str]]:
    ordered = sorted(image_ids)
    return [ordered[start:start + batch_size] for start in range(0, len(ordered), batch_size)]


def load_dense_model(paths: PseudoPaths, device: torch.device, class_names: list[str],
                     precision: str = "fp32") -> tuple[DenseModel, int]:
    """The trained WeakCLIP as a ``(B, 3, h, w) → (B, K, h/4, w/4)`` logits callable on ``device``, its
    forward at ``precision`` (``runtime.precision``; fp32: no autocast), the logits float32 either way; and the
    smallest input side it takes (``WeakCLIP.min_input_side``), which the windows are padded to.
    ``class_names``: the dataset's; a model trained for others (``prepare`` re-run on another dataset since)
    is refused naming its file."""
    if paths.clip_dir is not None:
        require_input(paths.clip_dir / WEIGHTS_FILE, "clip")
    model = load_weakclip_model(require_input(paths.model, "weakclip_train"), paths.clip_dir).to(device).eval()
    if list(model.class_names) != list(class_names):
        raise WeakClipArtifactError(f"{paths.model}: trained for the classes {list(model.class_names)}, the "
                                    f"dataset has {list(class_names)} (re-run weakclip_train)")

    def logits_of(images: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            logits = model(images).logits
        return logits.float()

    return logits_of, model.min_input_side()


def run_shard(params: Params, shard: Shard = Shard(), paths: PseudoPaths = PseudoPaths(),
              stop_after_images: int | None = None, show_progress: bool = True) -> int:
    """Predict and refine this shard's undone images into the work folder; returns how many it wrote.

    ``stop_after_images`` returns once that many images of this call are recorded (a stand-in for a kill
    in tests; the in-flight CRF jobs are abandoned like a killed run's).
    """
    pseudo = params.pseudo
    dataset = PreparedDataset.open(params.dataset.prepared_dir)
    gt_dirs = ground_truth_dirs(dataset.root, given_path(params.dataset.source), given_path(params.dataset.coco_masks))
    refuse_ground_truth_dir(pseudo.output_dir, gt_dirs, "pseudo.output_dir")
    check_output_folders(params, paths)
    config = work_config(params, dataset, require_input(paths.model, "weakclip_train"))
    work_dir = work_dir_of(paths, config)
    work_dir.mkdir(parents=True, exist_ok=True)
    write_json(work_dir / "config.json", config)
    remove_killed_writers_temporaries(params, paths, work_dir)
    done = done_images(work_dir)
    batches = id_batches(dataset.split(params.dataset.train_split), pseudo.batch_size)[shard.index::shard.count]
    pending_batches = [batch for batch in batches if any(image_id not in done for image_id in batch)]
    n_todo = sum(image_id not in done for batch in pending_batches for image_id in batch)
    if not pending_batches:
        return 0

    set_threads(params.runtime.threads)
    torch.manual_seed(params.runtime.seed)
    device = resolve_device(params.runtime.device)
    model, min_window = load_dense_model(paths, device, dataset.class_names, params.runtime.precision)
    if pseudo.crop < min_window:
        raise ConfigError(f"pseudo.crop: {pseudo.crop} is below {min_window}, the smallest window the trained "
                          f"WeakCLIP ({paths.model}) takes: two of its patches a side")
    views = InferenceAugmentation(scales=tuple(pseudo.scales), flip=pseudo.flip, crop=pseudo.crop,
                                  stride=pseudo.stride, pad_to_crop=pseudo.pad_small_windows, min_window=min_window,
                                  img_scale=(pseudo.img_scale[0], pseudo.img_scale[1]) if pseudo.img_scale else None)
    all_classes = pseudo.softmax_classes == "all"  # the reference: softmax over every class, CRF on the argmax's
    crf = pseudo.crf if pseudo.use_crf else None
    executor = (ProcessPoolExecutor(max_workers=pseudo.workers, mp_context=multiprocessing.get_context("spawn"),
                                    initializer=die_with_parent)
                if pseudo.workers > 0 else None)
    manifest = ManifestWriter(work_dir / shard.manifest_name)
    in_flight: deque[Future] = deque()
    max_in_flight = 2 * max(1, pseudo.workers) * pseudo.batch_size
    written = 0
    progress = tqdm(total=n_todo, desc=f"{STAGE} {shard.index}/{shard.count}", unit="img", disable=not show_progress)

    def record(future: Future) -> None:
        nonlocal written
        manifest.add(future.result())
        written += 1
        progress.update(1)

    try:
        for batch in pending_batches:
            images = [dataset.image(image_id) for image_id in batch]
            labels = [dataset.image_labels(image_id) for image_id in batch]
            selected = predict_reduced_batch(model, images, None if all_classes else labels, dataset.n_classes, views,
                                             lambda index, probability: rows_for_crf(probability, labels[index],
                                                                                     all_classes),
                                             device, max_forward_batch=pseudo.batch_size)
            for image_id, image, (allowed, subset) in zip(batch, images, selected):
                if image_id in done:
                    continue
                job = RefineJob(image_id, image, np.ascontiguousarray(subset), allowed, crf,
                                pseudo.absent_class_odds_ratio, work_dir)
                if executor is None:
                    manifest.add(refine_and_write(job))
                    written += 1
                    progress.update(1)
                else:
                    in_flight.append(executor.submit(refine_and_write, job))
            # Record what finished without waiting; block only when too much is queued.
            while in_flight and (in_flight[0].done() or len(in_flight) > max_in_flight):
                record(in_flight.popleft())
            if stop_after_images is not None and written >= stop_after_images:
                return written
        while in_flight:
            wait([in_flight[0]], return_when=FIRST_COMPLETED)
            record(in_flight.popleft())
    finally:
        progress.close()
        manifest.close()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
    return written


def rows_for_crf(probability: torch.Tensor, labels: list[int],
                 all_classes: bool) -> tuple[tuple[int, ...], np.ndarray]:
    """(the classes an image's CRF decides between, their rows of ``probability`` (K, H, W) on the host).

    Only these rows leave the device (COCO: 3-4 of 81 maps of 640x480, where copying all of them was 100 MB an
    image). ``all_classes`` (``pseudo.softmax_classes: all``): the argmax's classes and background, renormalised
    (the reference's CRF step); otherwise background and the image's labels, the rows as they are."""
    if all_classes:
        shown, rows = shown_classes_on_device(probability, always=(0,))
        return tuple(int(k) for k in shown), rows
    allowed = (0, *sorted(labels))
    return allowed, probability[list(allowed)].float().cpu().numpy()


# --------------------------------------------------------------------------- provenance and assembly

def upstream_seed_provenance(weakclip_metrics: Path) -> dict[str, Any]:
    """How the seeds WeakCLIP trained on were made, from ``metrics/weakclip.json``.

    A missing file or flag stops the stage: without it the chain cannot claim that no GT was used.
    """
    if not weakclip_metrics.is_file():
        raise ProvenanceError(f"{weakclip_metrics}: missing; it records whether GT chose the seed thresholds "
                              "(run weakclip_train) and pseudo_masks will not report 'no GT used' without it")
    data = json.loads(weakclip_metrics.read_text())
    if not isinstance(data.get(SEEDS_GT_FLAG), bool):
        raise ProvenanceError(f"{weakclip_metrics}: key {SEEDS_GT_FLAG!r} (true/false) is missing; cannot "
                              "establish whether GT chose the seed thresholds")
    return {"seeds_thresholds_chosen_with_gt": data[SEEDS_GT_FLAG], "seed_mode": data.get("seed_mode"),
            "cam_variant": data.get("cam_variant"),
            "gt_used": data.get("gt_used") is True}  # WeakCLIP trained on GT masks (weakclip.seeds.source: gt)


def check_gt_claim(metrics: dict[str, Any], upstream: dict[str, Any]) -> None:
    """Refuse a report that says "no threshold chosen with GT" over seeds that were thresholded with GT."""
    if upstream["seeds_thresholds_chosen_with_gt"] and not metrics["threshold_chosen_with_gt"]:
        raise ProvenanceError("metrics/pseudo.json would report threshold_chosen_with_gt=false, but the seeds "
                              f"WeakCLIP trained on were thresholded with GT ({SEEDS_GT_FLAG}=true upstream)")


def assemble(params: Params, paths: PseudoPaths = PseudoPaths()) -> dict[str, Any]:
    """Outputs from a complete work folder: the mask folder, ``metrics/pseudo.json``, ``reports/pseudo/``."""
    pseudo = params.pseudo
    dataset = PreparedDataset.open(params.dataset.prepared_dir)
    gt_dirs = ground_truth_dirs(dataset.root, given_path(params.dataset.source), given_path(params.dataset.coco_masks))
    refuse_ground_truth_dir(pseudo.output_dir, gt_dirs, "pseudo.output_dir")
    check_output_folders(params, paths)
    upstream = upstream_seed_provenance(paths.weakclip_metrics)
    config = work_config(params, dataset, require_input(paths.model, "weakclip_train"))
    work_dir = work_dir_of(paths, config)
    split = params.dataset.train_split
    image_ids = sorted(dataset.split(split))
    score_split = params.dataset.scored_split
    scored_ids = set(dataset.scored_ids(split, score_split))
    done = done_images(work_dir) if work_dir.is_dir() else {}
    missing = [image_id for image_id in image_ids if image_id not in done]
    if missing:
        raise RuntimeError(f"{work_dir}: {len(missing)} of {len(image_ids)} images are not done (first: "
                           f"{missing[0]}); run the remaining shards (or the unsharded command) first")

    labelled_pairs = sum(len(dataset.image_labels(image_id)) for image_id in image_ids)
    absent_class_repair = {
        "odds_ratio": pseudo.absent_class_odds_ratio,
        "labelled_pairs": labelled_pairs,
        "absent_before_repair": sum(int(done[image_id]["absent_before_repair"]) for image_id in image_ids),
        "absent_after_repair": sum(int(done[image_id]["absent_after_repair"]) for image_id in image_ids),
        "images_with_absent_class": sum(int(done[image_id]["absent_before_repair"]) > 0 for image_id in image_ids),
    }
    before, after = ConfusionAccumulator(dataset.n_classes), ConfusionAccumulator(dataset.n_classes)
    per_image_miou: dict[str, float] = {}
    remove_killed_writers_temporaries(params, paths, work_dir)
    for image_id in image_ids:
        if image_id not in scored_ids or not dataset.has_mask(image_id):
            continue
        ground_truth = dataset.checked_mask(image_id)
        before.add(ground_truth, read_mask(work_dir / "raw" / f"{image_id}.png"))
        confusion = confusion_matrix(ground_truth, read_mask(work_dir / "masks" / f"{image_id}.png"),
                                     dataset.n_classes)
        after.confusion += confusion
        score = image_miou(confusion)
        if score is not None:  # a mask of ignore (255) only is neither scored nor among the worst
            per_image_miou[image_id] = score
    n_scored = len(per_image_miou)
    before_report, after_report = before.report(), after.report()
    final_report = after_report  # the written masks (without CRF and repair they equal the raw ones)

    provenance = {"made_by": f"pipeline.{STAGE}", "split": split, "n_images": len(image_ids),
                  "gt_used": upstream["gt_used"], "threshold_chosen_with_gt": upstream["seeds_thresholds_chosen_with_gt"],
                  "seed_mode": upstream["seed_mode"], "cam_variant": upstream["cam_variant"],
                  "model_sha256": config["model_sha256"]}
    with atomic_dir(pseudo.output_dir, MASK_FOLDER_CONTENTS, key="pseudo.output_dir") as output_dir:
        for image_id in image_ids:
            shutil.copyfile(work_dir / "masks" / f"{image_id}.png", output_dir / f"{image_id}.png")
        write_json(output_dir / PROVENANCE_FILE, provenance)

    worst = lowest_scoring(per_image_miou, N_WORST)
    final_caption = "after CRF" if pseudo.use_crf else "argmax"
    if pseudo.absent_class_odds_ratio > 0:
        final_caption += " + repair"
    with atomic_dir(paths.reports, REPORT_CONTENTS) as reports_dir:
        for prefix, chosen in (("sample", evenly_spaced(image_ids, pseudo.overlay_samples)), ("worst", worst)):
            for rank, image_id in enumerate(chosen):
                masks = ([("GT", dataset.mask(image_id))] if dataset.has_mask(image_id) else [])
                masks += [("before CRF", read_mask(work_dir / "raw" / f"{image_id}.png")),
                          (final_caption, read_mask(work_dir / "masks" / f"{image_id}.png"))]
                score = f"  mIoU {100 * per_image_miou[image_id]:.1f}" if image_id in per_image_miou else ""
                save_overlay(reports_dir / f"{prefix}_{rank}_{image_id}.png", dataset.image(image_id), masks,
                             caption=f"{image_id}{score}")

    metrics: dict[str, Any] = {
        "miou": final_report.miou if n_scored else None,
        "miou_before_crf": before_report.miou if n_scored else None,
        "miou_after_crf": after_report.miou if n_scored and pseudo.use_crf else None,
        **{key: value for key, value in final_report.as_dict(dataset.class_names).items() if key != "miou"},
        "before_crf": before_report.as_dict(dataset.class_names) if n_scored else None,
        "split": score_split,
        "predicted_split": split,
        "n_images": len(image_ids),
        "n_scored": n_scored,
        "use_crf": pseudo.use_crf,
        "scales": list(pseudo.scales),
        "flip": pseudo.flip,
        "crf": to_plain(pseudo.crf),
        "absent_class_repair": absent_class_repair,
        "threshold_chosen_with_gt": bool(upstream["seeds_thresholds_chosen_with_gt"]),
        "this_stage_chose_threshold_with_gt": False,
        "seed_mode": upstream["seed_mode"],
        "cam_variant": upstream["cam_variant"],
        "worst_images": {image_id: per_image_miou[image_id] for image_id in worst},
        **({"gt_used_in_training": True} if upstream["gt_used"] else {}),
    }
    if not n_scored:  # label-only data: the masks are written; the figures say why there are none
        metrics.update({key: None for key in ("pixel_accuracy", "per_class", "precision", "recall")},
                       not_scored=NOT_SCORED_NO_GT)
    check_gt_claim(metrics, upstream)
    write_json(paths.metrics, metrics)
    shutil.rmtree(work_dir, ignore_errors=True)
    return metrics


def summary_line(params: Params, args: argparse.Namespace, context: None) -> str:
    started = time.perf_counter()
    lines = []
    if not args.merge:
        written = run_shard(params, args.shard)
        lines.append(f"{STAGE}: shard {args.shard.index}/{args.shard.count} wrote {written} masks "
                     f"in {time.perf_counter() - started:.1f} s")
        if args.shard.count > 1:
            return "\n".join([*lines, f"{STAGE}: when every shard is done, run `python -m pipeline.{STAGE} --merge`"])
    metrics = assemble(params)
    repair = metrics["absent_class_repair"]
    scores = (f"mIoU {metrics['miou']:.4f}" + (f" (before CRF {metrics['miou_before_crf']:.4f})"
                                               if metrics["miou_before_crf"] is not None else "")
              if metrics["miou"] is not None else str(metrics.get("not_scored", "not scored: no GT")))
    return "\n".join([
        *lines,
        f"{STAGE}: {metrics['split']} {scores} over "
        f"{metrics['n_scored']} of {metrics['n_images']} images, {time.perf_counter() - started:.1f} s",
        f"{STAGE}: labelled classes with no pixel: {repair['absent_before_repair']} of {repair['labelled_pairs']} "
        f"after CRF, {repair['absent_after_repair']} after the absent-class repair "
        f"(pseudo.absent_class_odds_ratio {repair['odds_ratio']}; 0 = off)"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shard", type=Shard.parse, default=Shard(),
                        help="i/n: process only batches i, i+n, ... (run every shard, then --merge)")
    parser.add_argument("--merge", action="store_true", help="assemble the outputs of finished shards")


SPEC = StageSpec(name=STAGE, module="pipeline.pseudo_masks", description=__doc__.splitlines()[0], run=summary_line,
                 add_arguments=add_arguments,
                 locks=lambda args: shard_locks(STAGE, args.shard.index, args.shard.count, args.merge))


def main(argv: list[str] | None = None) -> int | None:
    return run_stage(SPEC, argv)


if __name__ == "__main__":
    run_stage_cli(main, "pseudo_masks", (ProvenanceError,))

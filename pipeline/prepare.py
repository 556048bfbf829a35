"""Stage ``prepare``: materialise the dataset in VOC layout (dvc.yaml: outs ``${dataset.prepared_dir}``,
``reports/dataset_preview.png``).

``dataset.name`` picks the source: the built-in synthetic generator, a VOC 2012 tree (labels from its masks
or from MCTformer's ``cls_labels.npy``), a COCO 2014 tree, or your own label-only folder (``custom``; README
"Your own data") (``dataset.source``). The prepared ``SegmentationClass/`` always exists; when no image has a
GT mask it holds only ``NO_MASKS_FILE`` (git and DVC keep no empty folder). The prepared folder is built in a
temporary folder beside it, checked (splits, labels, the preview drawn from it) and only then swapped in whole, so a
failure (a ``DatasetError`` naming the bad file) leaves any earlier prepared folder untouched.
Symlinked source images are followed: the prepared folder holds their targets' bytes, never a link.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from weakclip_core.artifacts.atomic import FolderContents, atomic_dir, write_text
from weakclip_core.config import Params
from weakclip_core.config.schema import given_path
from weakclip_core.data.coco import prepare_coco
from weakclip_core.data.imports import masks_off_their_labels
from weakclip_core.data.labels_only import labels_file_of, prepare_custom, read_cls_labels_npy
from weakclip_core.data.layout import (CAPTIONS_FILE, IGNORE_INDEX, DatasetError, PreparedDataset,
                                      check_score_split_inside, labels_from_mask, write_labels, write_split)
from weakclip_core.data.preview import write_dataset_preview
from weakclip_core.data.synthetic import class_names, generate_synthetic
from weakclip_core.data.voc import VOC_CLASS_NAMES, prepare_voc

from pipeline._stage import StageSpec, run_stage, run_stage_cli

PREVIEW_PATH = Path("reports/dataset_preview.png")
# All that prepare writes into ``dataset.prepared_dir``; atomic_dir refuses to replace a folder holding more.
NO_MASKS_FILE = "NO_GT_MASKS.txt"
"""Written into ``SegmentationClass/`` when no image has a GT mask. ``seg_train@gt`` lists that folder as a dep, and
a DVC output's manifest lists files only: an empty sub-folder of the prepared folder was not re-created by ``dvc
pull`` or ``dvc checkout``, so on a fresh clone (or a pool worker) ``dvc status`` called the dep deleted."""
PREPARED_CONTENTS = FolderContents(files=("labels.json", "captions.txt"), folders=(
    ("JPEGImages", FolderContents(files=("*.jpg",))),
    ("SegmentationClass", FolderContents(files=("*.png", NO_MASKS_FILE))),
    ("ImageSets", FolderContents(folders=(("Segmentation", FolderContents(files=("*.txt",))),)))))


@dataclass(frozen=True)
class PrepareSummary:
    """What ``prepare`` wrote: counts per split, class names, bytes on disk, wall time, and the images left out
    of the splits for having no class label (``left_out``)."""

    dataset: str
    root: Path
    split_counts: dict[str, int]
    class_names: list[str]
    total_bytes: int
    seconds: float
    left_out: tuple[str, ...] = ()
    mask_label_warning: str | None = None  # some GT masks show classes their image's given labels do not list

    def left_out_line(self) -> str | None:
        """Says how many images were dropped for having no class, and one of them (``None`` when none was)."""
        if not self.left_out:
            return None
        return (f"left out: {len(self.left_out)} image(s) with no class label (nothing annotated, or only crowd / "
                f"ignore regions: nothing for a weakly supervised model to learn from), e.g. {self.left_out[0]}")

    def describe(self) -> str:
        splits = ", ".join(f"{split}: {count}" for split, count in self.split_counts.items())
        foreground = self.class_names[1:]
        return (f"prepare: {self.dataset} -> {self.root} ({splits}; {len(foreground)} classes + background: "
                f"{', '.join(foreground[:20])}{' ...' if len(foreground) > 20 else ''}; "
                f"{self.total_bytes / 1e6:.1f} MB) in {self.seconds:.1f} s")


def _build_synthetic(params: Params, root: Path, progress: bool) -> None:
    dataset = params.dataset
    split_sizes = {dataset.train_split: dataset.synthetic.n_train, dataset.val_split: dataset.synthetic.n_val}
    records = generate_synthetic(dataset.synthetic, dataset.seed, root, split_sizes, progress=progress)
    for split in split_sizes:
        write_split(root, split, [record.image_id for record in records if record.split == split])
    write_labels(root, "synthetic", class_names(dataset.synthetic.n_classes),
                 {record.image_id: record.classes for record in records})
    write_text(root / CAPTIONS_FILE, "".join(f"{record.image_id}\t{record.caption}\n" for record in records))


def class_list(class_ids: list[int], class_names: list[str]) -> str:
    return ", ".join(f"{class_names[c]} ({c})" if 0 <= c < len(class_names) else str(c) for c in class_ids) or "none"


def check_masks_are_not_binary(shown: dict[str, list[int]], with_ignore: set[str], prepared: PreparedDataset,
                               masks_from: Path, order_rule: str) -> None:
    """Single-class mask sets are often saved binary, 0 for background and 255 for the object. Read as class
    indices, 255 is *ignore*: every object pixel drops out of the GT scores, which are then taken on background
    alone, without a word. More than half of the masks of images labelled with a class showing no foreground
    class but ignore pixels is that encoding (a VOC mask's 255 is a thin band around objects it also shows):
    a ``DatasetError`` naming the mask folder. ``shown``: each mask's foreground classes; ``with_ignore``: the
    images whose mask holds ignore pixels."""
    labelled = [image_id for image_id in shown if prepared.labels.get(image_id)]
    binary = [image_id for image_id in labelled if not shown[image_id] and image_id in with_ignore]
    if binary and 2 * len(binary) > len(labelled):
        first = binary[0]
        raise DatasetError(
            f"{masks_from}: {len(binary)} of the {len(labelled)} GT masks of labelled images show no class, only "
            f"background (0) and ignore ({IGNORE_INDEX}) (first: {first}, labelled "
            f"{class_list(prepared.labels[first], prepared.class_names)}): binary 0/{IGNORE_INDEX} masks? A mask's "
            f"value is the pixel's class index ({order_rule}) and {IGNORE_INDEX} means ignore: set each object's "
            "pixels to its class index")


def check_gt_masks_follow_labels(prepared: PreparedDataset, image_ids: list[str], masks_from: Path,
                                 labels_from: Path, order_rule: str) -> str | None:
    """Where the image-level labels are given apart from the GT masks (your own data's labels file, VOC with
    ``cls_labels.npy``), a mask showing a class its image is not labelled with says the two disagree on the
    class indices (a ``classes.txt`` with an extra first line, a shifted ``cls_labels.npy``), and every GT
    figure downstream would be scored against the wrong classes. More than half of the masks with foreground
    so, each also missing a class its labels list (the sign of a shifted index): a ``DatasetError`` naming both
    files. Fewer, or labels that list only part of what the masks show (a real VOC has a few images whose XML
    labels and SBD masks differ; a tagger's labels may list only some classes): the returned warning line. None
    disagreeing: ``None``."""
    shown: dict[str, list[int]] = {}
    with_ignore: set[str] = set()
    for image_id in image_ids:  # one mask in memory at a time: a VOC or COCO split holds thousands
        if prepared.has_mask(image_id):
            mask = prepared.mask(image_id)
            shown[image_id] = labels_from_mask(mask)
            if (mask == IGNORE_INDEX).any():
                with_ignore.add(image_id)
    check_masks_are_not_binary(shown, with_ignore, prepared, masks_from, order_rule)
    with_foreground, strays = masks_off_their_labels(shown, prepared.labels)
    if not strays:
        return None
    # Crossed: the mask shows a class its labels lack AND lacks a class its labels list, as a shifted or reordered
    # index does; labels that list only part of what the mask shows (a tagger's labels) are not crossed.
    crossed = [image_id for image_id in strays if not set(prepared.labels[image_id]) <= set(shown[image_id])]
    first = (crossed or strays)[0]
    example = (f"first: {first}'s mask shows {class_list(shown[first], prepared.class_names)}, its labels say "
               f"{class_list(prepared.labels[first], prepared.class_names)}")
    if 2 * len(crossed) > len(with_foreground):
        raise DatasetError(f"{masks_from}: {len(strays)} of the {len(with_foreground)} GT masks with foreground show "
                           f"classes their image is not labelled with in {labels_from} ({example}): the masks' "
                           f"class indices and the labels must follow one class order ({order_rule})")
    return (f"GT masks: {len(strays)} of {len(with_foreground)} in {masks_from} show classes their image's labels "
            f"({labels_from}) do not list ({example}); they are scored as they are, and the labels (what the chain "
            "learns from) stay as given")


def run(params: Params, preview_path: Path = PREVIEW_PATH, progress: bool = True) -> PrepareSummary:
    """Build ``params.dataset.prepared_dir`` and the preview picture; returns what was written."""
    dataset = params.dataset
    if dataset.train_split == dataset.val_split:
        raise DatasetError(f"dataset.train_split and dataset.val_split are both {dataset.train_split!r}")
    started = time.perf_counter()
    prepared_dir = Path(dataset.prepared_dir)
    splits = list(dict.fromkeys([dataset.train_split, dataset.val_split, dataset.scored_split]))
    with atomic_dir(prepared_dir, PREPARED_CONTENTS, key="dataset.prepared_dir",  # checked before any work
                    reads={"dataset.source": given_path(dataset.source)} if dataset.name != "synthetic" else None
                    ) as staging_dir:
        labels_file = given_path(dataset.voc_cls_labels) if dataset.name == "voc" else None
        if dataset.name == "synthetic":
            _build_synthetic(params, staging_dir, progress)
        elif dataset.name == "voc":
            cls_labels = read_cls_labels_npy(labels_file, len(VOC_CLASS_NAMES) - 1) if labels_file else None
            prepare_voc(dataset.source, staging_dir, splits, dataset.voc_mask_dir,
                        drop_unlabelled_from=(dataset.train_split, dataset.scored_split), progress=progress,
                        image_labels=cls_labels, image_labels_file=labels_file)
        elif dataset.name == "custom":
            prepare_custom(dataset.source, staging_dir, splits,
                           drop_unlabelled_from=(dataset.train_split, dataset.scored_split), progress=progress)
        else:
            prepare_coco(dataset.source, staging_dir, splits, drop_unlabelled_from=(dataset.train_split,),
                         progress=progress, masks_dir=given_path(dataset.coco_masks),
                         mask_encoding=dataset.coco_mask_encoding)
        masks = staging_dir / "SegmentationClass"
        masks.mkdir(exist_ok=True)
        if not any(masks.glob("*.png")):
            write_text(masks / NO_MASKS_FILE, "No image of this dataset has a GT mask: the mask-scored figures read "
                                              "'not scored' and seg_train@gt trains nothing. This file keeps the "
                                              "folder, which git and DVC do not keep empty.\n")
        prepared = PreparedDataset.open(staging_dir)
        split_counts = {split: len(prepared.split(split)) for split in splits}
        listed = {image_id for split in splits for image_id in prepared.split(split)}
        left_out = tuple(sorted(image_id for image_id, classes in prepared.labels.items()
                                if not classes and image_id not in listed))
        mask_label_warning = None
        if dataset.name == "custom":  # labels given apart from the masks: do the two agree on the classes?
            mask_label_warning = check_gt_masks_follow_labels(
                prepared, sorted(listed), Path(dataset.source) / "masks", labels_file_of(Path(dataset.source)),
                "0 background, class i = line i of classes.txt after an optional first 'background' line")
        elif dataset.name == "voc" and labels_file is not None:
            mask_label_warning = check_gt_masks_follow_labels(
                prepared, sorted(listed), Path(dataset.source) / dataset.voc_mask_dir, labels_file,
                "0 background, class i = entry i - 1 of each cls_labels.npy vector, VOC's alphabetical order")
        check_score_split_inside(prepared.split(dataset.train_split), prepared.split(dataset.scored_split),
                                 dataset.train_split, dataset.scored_split,
                                 lists_in=(dataset.source if dataset.name != "synthetic"
                                           else "the synthetic generator's output: its train and val are disjoint"))
        shared = sorted(set(prepared.split(dataset.train_split)) & set(prepared.split(dataset.val_split)))
        if shared:
            raise DatasetError(f"dataset.train_split {dataset.train_split!r} and dataset.val_split "
                               f"{dataset.val_split!r} share {len(shared)} images ({', '.join(shared[:5])}"
                               f"{', ...' if len(shared) > 5 else ''}): val figures would score images the "
                               "models trained on")
        # The preview reads every image it shows: drawn from the staging folder, before the swap, so a
        # failure here too leaves the earlier prepared folder in place (docs/RELIABILITY.md, row 27).
        write_dataset_preview(prepared, dataset.train_split, preview_path)
    prepared = PreparedDataset.open(prepared_dir)
    total_bytes = sum(path.stat().st_size for path in prepared_dir.rglob("*") if path.is_file())
    return PrepareSummary(dataset=dataset.name, root=prepared_dir, split_counts=split_counts,
                          class_names=prepared.class_names, total_bytes=total_bytes,
                          seconds=time.perf_counter() - started, left_out=left_out,
                          mask_label_warning=mask_label_warning)


def class_frequencies(prepared: PreparedDataset, split: str) -> Counter[str]:
    """How many images of ``split`` carry each class (for the printed summary)."""
    return Counter(prepared.class_names[c] for image_id in prepared.split(split) for c in prepared.labels[image_id])


def ground_truth_line(params: Params, prepared: PreparedDataset) -> str:
    """How many prepared images have a GT mask. With image-level labels given (VOC + cls_labels.npy) masks are
    optional, so a mistyped ``dataset.voc_mask_dir`` prepares without a word and every figure downstream would
    read "not scored: no GT" hours later: say it here, naming the folder."""
    image_ids = {image_id for split in (params.dataset.train_split, params.dataset.val_split)
                 for image_id in prepared.split(split)}
    with_gt = sum(prepared.has_mask(image_id) for image_id in image_ids)
    line = f"GT masks: {with_gt} of {len(image_ids)} images"
    if with_gt:
        return line
    mask_folder = Path(params.dataset.source) / params.dataset.voc_mask_dir
    missing = (f" ({mask_folder} not found: dataset.voc_mask_dir)"
               if params.dataset.name == "voc" and not mask_folder.is_dir() else "")
    return line + missing + ": every score downstream will say 'not scored: no GT'"


def summary_line(params: Params, args: argparse.Namespace, context: None) -> str:
    summary = run(params, progress=not args.no_progress)
    prepared = PreparedDataset.open(summary.root)
    frequencies = class_frequencies(prepared, params.dataset.train_split)
    return "\n".join([summary.describe(), *filter(None, [summary.left_out_line(), summary.mask_label_warning]),
                      ground_truth_line(params, prepared),
                      "images per class (" + params.dataset.train_split + "): "
                      + ", ".join(f"{name} {count}" for name, count in sorted(frequencies.items(), key=lambda kv: -kv[1])),
                      f"preview: {PREVIEW_PATH}"])


SPEC = StageSpec(name="prepare", module="pipeline.prepare", description=__doc__.splitlines()[0], run=summary_line,
                 add_arguments=lambda parser: parser.add_argument("--no-progress", action="store_true",
                                                                  help="hide progress bars"))


def main(argv: list[str] | None = None) -> int | None:
    return run_stage(SPEC, argv)

if __name__ == "__main__":
    run_stage_cli(main, "prepare")

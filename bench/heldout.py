"""WeakCLIP scored on the held-out val split, as the reference evaluates it.

Why: ``weakclip_train`` scores its model on the train split it was trained on, restricted to each image's
labels + background (``metrics/weakclip.json``): the pseudo-mask setting, where the image-level labels are
known and the model only has to place them. The reference evaluates WeakCLIP otherwise: its mmseg config
runs the evaluation hook on VOC **val** every 500 iterations (``evaluation = dict(interval=500,
metric='mIoU')``, ``data.val`` = VOC val), with the plain argmax over all classes, and the paper's ablation
tables ("VOC val") report that figure. There the model must also tell *which* classes an image holds, which
is the knowledge a pretrained CLIP brings and a random one lacks.

This scores any revision's trained WeakCLIP that way, without touching the chain: the model and its frozen
CLIP are read from the DVC cache at that revision (a DVC experiment's commit, or the workspace), the images
from the workspace's prepared dataset (refused when the revision prepared another one). Inference is the
stage's own: single scale, no CRF, the training crop as the sliding window; ``unrestricted`` is the
reference's val figure, ``labelled`` the same images restricted to their labels + background.

    python -m bench.heldout score                       # the workspace's model
    python -m bench.heldout score --rev abl-baseline-s1 --rev abl-random-clip-s1
    python -m bench.heldout score --rev abl-baseline-s1 --map matching   # the text matching map alone

``bench.ablations collect --heldout`` adds these figures to the ablation tables.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import yaml

from weakclip_core.artifacts.weakclip import load_weakclip_model
from weakclip_core.config.params import params_from_dict, parse_params_text
from weakclip_core.data.layout import PreparedDataset
from weakclip_core.evaluation.split_score import score_argmax_on_split
from weakclip_core.method.inference import InferenceAugmentation
from weakclip_core.models.weakclip.model import WeakClipOutput

REPO = Path(__file__).resolve().parents[1]
MODEL_FILE = "artifacts/weakclip/model.pt"
CLIP_DIR = "artifacts/clip"
BATCH = 16

Logits = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class HeldOutScores:
    """mIoU of one trained WeakCLIP on ``split``: over all classes (the reference's val figure) and restricted
    to each image's labels + background; ``n_images`` scored (those with a GT mask)."""

    split: str
    unrestricted_miou: float | None
    labelled_miou: float | None
    n_images: int


def split_miou(logits: Logits, dataset: PreparedDataset, image_ids: Sequence[str], tta: InferenceAugmentation,
               restrict_to_labels: bool) -> float | None:
    """mIoU (VOC convention, 255 ignored) of ``logits``' argmax over the images of ``image_ids`` that have a
    GT mask; ``restrict_to_labels``: only each image's labels + background may win. None: nothing scored."""
    accumulator, n_scored = score_argmax_on_split(logits, dataset, image_ids, tta, restrict_to_labels,
                                                  batch_size=BATCH)
    return accumulator.report().miou if n_scored else None


def score_split(logits: Logits, dataset: PreparedDataset, split: str, tta: InferenceAugmentation) -> HeldOutScores:
    image_ids = dataset.split(split)
    return HeldOutScores(split=split,
                         unrestricted_miou=split_miou(logits, dataset, image_ids, tta, restrict_to_labels=False),
                         labelled_miou=split_miou(logits, dataset, image_ids, tta, restrict_to_labels=True),
                         n_images=sum(dataset.has_mask(image_id) for image_id in image_ids))


def resolve_revision(repo: Path, rev: str) -> str:
    """A commit for ``rev``: a git revision, or a DVC experiment's name (``refs/exps/.../<name>``)."""
    resolved = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=repo,
                              capture_output=True, text=True)
    if resolved.returncode == 0:
        return resolved.stdout.strip()
    found = subprocess.run(["git", "for-each-ref", "--format=%(objectname)", f"refs/exps/**/{rev}"], cwd=repo,
                           capture_output=True, text=True, check=True).stdout.split()
    if len(found) != 1:
        raise ValueError(f"{repo}: '{rev}' is neither a git revision nor one DVC experiment's name "
                         f"({len(found)} experiments of that name)")
    return found[0]


def prepared_out_hash(lock: dict, prepared_dir: str) -> str | None:
    outs = ((lock.get("stages") or {}).get("prepare") or {}).get("outs") or []
    return next((out.get("md5") for out in outs if out.get("path") == prepared_dir), None)


SCORED_MAPS = ("logits", "matching")
"""What ``score_revision`` scores: ``logits``, the model's output P (the figure of the tables); ``matching``, the
text-to-patch cosine map λ' that co-attention refines and the decoder reads beside the pyramid (its argmax at
1/16 of the input, bilinearly resized like the logits): how much of the segmentation the text matching alone
carries."""


def check_scored_map(scored_map: str) -> None:
    if scored_map not in SCORED_MAPS:
        raise ValueError(f"scored_map: expected one of {', '.join(SCORED_MAPS)}, got {scored_map!r}")


def selected_map(output: WeakClipOutput, scored_map: str) -> torch.Tensor:
    """The map of ``output`` that ``scored_map`` names (``SCORED_MAPS``), as float32 for scoring."""
    check_scored_map(scored_map)
    return (output.matching if scored_map == "matching" else output.logits).float()


def score_revision(repo: Path, rev: str | None, split: str | None = None,
                   scored_map: str = "logits") -> HeldOutScores:
    """Score the WeakCLIP trained at ``rev`` (None: the workspace) on ``split`` (None: ``dataset.val_split``);
    ``scored_map``: one of ``SCORED_MAPS``.

    The model and CLIP come from the DVC cache at ``rev``; the images from the workspace's prepared dataset,
    which must be the one ``rev`` trained on (the two dvc.lock hashes of the prepare stage's output agree)."""
    check_scored_map(scored_map)  # before any DVC work
    # DVC is imported here: the scoring functions above are used by the tests without a repository.
    from dvc.api import DVCFileSystem

    commit = None if rev is None else resolve_revision(repo, rev)
    filesystem = DVCFileSystem(str(repo), rev=commit)
    with filesystem.open("params.yaml", "r") as handle:
        params = params_from_dict(parse_params_text(handle.read(), f"params.yaml at {rev or 'the workspace'}"))
    prepared_dir = params.dataset.prepared_dir
    if commit is not None:
        with filesystem.open("dvc.lock", "r") as handle:
            trained_on = prepared_out_hash(yaml.safe_load(handle.read()), prepared_dir)
        workspace_lock = repo / "dvc.lock"
        here = prepared_out_hash(yaml.safe_load(workspace_lock.read_text()), prepared_dir) \
            if workspace_lock.is_file() else None
        if trained_on != here:
            raise ValueError(f"{rev}: trained on {prepared_dir} {trained_on}, the workspace holds {here}: "
                             f"run `dvc checkout {prepared_dir}` at that revision's data first")
    dataset = PreparedDataset.open(repo / prepared_dir)
    train = params.weakclip.train
    tta = InferenceAugmentation(scales=(1.0,), flip=False, crop=train.crop, stride=max(1, 2 * train.crop // 3),
                                img_scale=(train.img_scale[0], train.img_scale[1]) if train.img_scale else None)
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder)
        filesystem.get(CLIP_DIR, str(local / "clip"), recursive=True)
        filesystem.get(MODEL_FILE, str(local / "model.pt"))
        model = load_weakclip_model(local / "model.pt", local / "clip").eval()

        @torch.no_grad()
        def logits(images: torch.Tensor) -> torch.Tensor:
            return selected_map(model(images), scored_map)

        return score_split(logits, dataset, split or params.dataset.val_split, tta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.heldout", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score revisions' (or the workspace's) WeakCLIP on the val split")
    score.add_argument("--rev", action="append", default=[],
                       help="git revision or DVC experiment name (repeatable; none: the workspace)")
    score.add_argument("--split", default=None, help="split to score (default: dataset.val_split)")
    score.add_argument("--map", choices=SCORED_MAPS, default="logits", dest="scored_map",
                       help="logits: the model's output (default); matching: the text-to-patch cosine map alone")
    args = parser.parse_args(argv)
    for rev in args.rev or [None]:
        scores = score_revision(REPO, rev, args.split, args.scored_map)
        shown = {key: (f"{100 * value:.1f}" if isinstance(value, float) else value)
                 for key, value in asdict(scores).items()}
        print(f"{rev or 'workspace'}: {shown}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Stage ``clip``: the frozen CLIP that WeakCLIP adapts → ``artifacts/clip/``, ``metrics/clip.json``.

``clip.source``:
- ``pretrain`` (synthetic default): a small open_clip (``clip.arch``) trained
  contrastively on the synthetic generator's own "web" of captioned images, disjoint from the
  WSSS splits (``clip.pretrain.corpus: web``), or on the train split's captions (``train_split``);
- ``file``: a local weights file (e.g. OpenAI ViT-B/16), recorded with its sha256;
- ``random``: a randomly initialised CLIP (the "no CLIP knowledge" ablation).

Whatever the source, the stage then measures the CLIP's zero-shot knowledge on
the val split ("a photo of a {class}" prompt scores vs image labels: mAP and
top-1) beside a randomly initialised CLIP of the same architecture, so the
metrics show whether the knowledge WeakCLIP relies on is real. The dense probe
(``weakclip_core.evaluation.dense_probe``, MaskCLIP-style, no threshold) measures
the same per patch: mIoU of the patch-to-prompt argmax on the train split's
scored images against their GT masks, for both CLIPs.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import open_clip
import torch
from torch.utils.data import Dataset

from weakclip_core.artifacts.atomic import FolderContents, atomic_dir, check_output_dir, sha256_of_file, write_json
from weakclip_core.models.clip import (INFO_FILE, MODEL_CONFIG_FILE, WEIGHTS_FILE, build_clip, clip_from_config,
                                       clip_model_config, named_model_config, save_clip_artifact)
from weakclip_core.training.clip_pretrain import (PROMPT_TEMPLATE, CaptionPairs, pretrain_clip, resize_for_clip,
                                         zero_shot_report, zero_shot_scores_of)
from weakclip_core.config import Params, to_plain
from weakclip_core.config.schema import ConfigError, given_path
from weakclip_core.data.layout import CAPTIONS_FILE, PreparedDataset
from weakclip_core.evaluation.dense_probe import (LAST_LAYER_PROBE_RULE, PROBE_RULE, DenseProbeResult, ProbeTokens,
                                                  Tokenizer, dense_probes_of)
from weakclip_core.evaluation.metrics import NOT_SCORED_NO_GT
from weakclip_core.data.synthetic import class_names as synthetic_class_names
from weakclip_core.runtime.device import resolve_device, seed_everything, set_threads
from weakclip_core.runtime.distributed import (DistributedContext, broadcast_from_main, run_on_main,
                                               single_process_context)
from weakclip_core.training.checkpoint import CHECKPOINT_ROOT, Checkpointer
from weakclip_core.training.web_corpus import WebCaptionStream, web_generator_config

from pipeline._stage import StageSpec, run_stage, run_stage_cli

ARTIFACT_DIR = Path("artifacts/clip")
METRICS_PATH = Path("metrics/clip.json")
EVAL_BATCH = 32
ARTIFACT_CONTENTS = FolderContents(files=(WEIGHTS_FILE, MODEL_CONFIG_FILE, INFO_FILE))  # all clip writes there


def image_batches(dataset: PreparedDataset, image_ids: list[str], size: int,
                  batch_size: int = EVAL_BATCH) -> Iterator[torch.Tensor]:
    """(b, 3, size, size) CLIP-normalised batches of the images, in order."""
    for start in range(0, len(image_ids), batch_size):
        yield torch.stack([resize_for_clip(dataset.image(image_id), size)
                           for image_id in image_ids[start:start + batch_size]])


def evaluate_zero_shot(models: list[torch.nn.Module], tokenizer: Tokenizer, dataset: PreparedDataset, split: str,
                       device: torch.device) -> list[dict]:
    """Prompt-score mAP / top-1 of each of ``models`` (of one input size) on ``split`` against the image-level
    labels, the images read once for all of them."""
    image_ids = dataset.split(split)
    size = int(models[0].visual.image_size[0])
    class_names = dataset.class_names[1:]
    all_scores = zero_shot_scores_of(models, tokenizer, image_batches(dataset, image_ids, size), class_names, device)
    labels = np.stack([dataset.label_vector(image_id, allow_empty=True)  # val keeps unannotated images
                       for image_id in image_ids])
    return [{**zero_shot_report(scores.numpy(), labels, class_names), "n_images": len(image_ids)}
            for scores in all_scores]


def pretraining_pairs(params: Params, dataset: PreparedDataset) -> tuple[Dataset, dict]:
    """The pre-training pairs ``clip.pretrain.corpus`` names, and what identifies them (for the checkpoint).

    ``web``: the synthetic generator's own stream (never a WSSS image); it needs ``dataset.name: synthetic``.
    ``train_split``: the prepared train split's images and captions.
    """
    cfg = params.clip
    if cfg.pretrain.corpus == "web":
        if params.dataset.name != "synthetic":
            captions = (" or clip.pretrain.corpus: train_split (the prepared train split's captions)"
                        if (dataset.root / CAPTIONS_FILE).is_file() else "")  # only the synthetic set ships captions
            raise ConfigError(f"clip.pretrain.corpus: 'web' streams the synthetic generator's images, but dataset.name "
                              f"is {params.dataset.name!r}; use clip.source: file with clip.weights (a local CLIP "
                              f"ViT-B/16 weights file){captions}")
        generator = web_generator_config(params.dataset.synthetic, cfg.pretrain.web_max_objects)
        if synthetic_class_names(generator.n_classes) != list(dataset.class_names):
            raise ConfigError(f"clip.pretrain.corpus: the web stream's classes ({generator.n_classes} from "
                              f"dataset.synthetic.n_classes) are not those of {dataset.root} "
                              f"({len(dataset.class_names) - 1}); re-run prepare with these params")
        stream = WebCaptionStream(generator, params.dataset.seed, cfg.pretrain.web_images, cfg.arch.image_size,
                                  cfg.pretrain.caption_dropout, cfg.pretrain.attribute_dropout)
        return stream, {"web": {"generator": to_plain(generator), "dataset_seed": params.dataset.seed}}
    pairs = CaptionPairs(dataset, dataset.split(params.dataset.train_split), cfg.arch.image_size,
                         params.runtime.seed, cfg.pretrain.caption_dropout)
    return pairs, {"prepared_dir": params.dataset.prepared_dir, "train_split": params.dataset.train_split,
                   "captions_sha256": sha256_of_file(dataset.root / CAPTIONS_FILE)}


def evaluate_dense_probes(models: list[torch.nn.Module], tokenizer: Tokenizer, dataset: PreparedDataset,
                          image_ids: list[str], device: torch.device) -> list[dict[ProbeTokens, DenseProbeResult]]:
    """The MaskCLIP-style dense probe of each of ``models`` on ``image_ids`` against their GT masks (no
    threshold), at the value path (MaskCLIP's reading) and at the last layer's tokens (WeakCLIP's), in one
    pass over the images for all of them."""
    return dense_probes_of(models, tokenizer, dataset, image_ids, device, ("value_path", "last_layer"),
                           batch_size=EVAL_BATCH)


def run(params: Params, artifact_dir: Path = ARTIFACT_DIR, metrics_path: Path = METRICS_PATH,
        checkpoint_root: Path | None = None, stop_after_steps: int | None = None,
        context: DistributedContext | None = None) -> dict | None:
    """Build/train/load the CLIP, write the artifact and the zero-shot metrics; returns the metrics.

    ``stop_after_steps`` (tests) stops pre-training after that many steps as if killed and writes nothing
    else; the next run resumes from the last checkpoint. Under DDP
    (``context`` from torchrun) the pre-training is data-parallel and rank 0
    alone evaluates and writes; every rank returns rank 0's metrics.
    """
    cfg = params.clip
    set_threads(params.runtime.threads)
    context = context or single_process_context(resolve_device(params.runtime.device))
    device = context.device
    dataset = PreparedDataset.open(params.dataset.prepared_dir)
    check_output_dir(artifact_dir, ARTIFACT_CONTENTS, reads={"dataset.prepared_dir": params.dataset.prepared_dir,
                                                             "clip.weights": given_path(cfg.weights)})
    seed_everything(params.runtime.seed)
    model = build_clip(cfg)
    # One tokenizer for pre-training and every evaluation: OpenAI's BPE at the model's own context length
    # (the small arch's 32, a ViT-B/16 file's 77); the random reference below has the same length.
    tokenizer = open_clip.get_tokenizer("ViT-B-16", context_length=int(model.context_length))
    info: dict = {"source": cfg.source}
    if cfg.source == "pretrain":
        pairs, corpus_identity = pretraining_pairs(params, dataset)
        checkpoint_config = {"clip": to_plain(cfg), "seed": params.runtime.seed,  # what the pairs are made of
                             "corpus": corpus_identity}
        checkpointer = Checkpointer("clip", checkpoint_config, root=checkpoint_root or CHECKPOINT_ROOT)
        result = pretrain_clip(model, pairs, tokenizer, cfg.pretrain, device, checkpointer, params.runtime.seed,
                               stop_after_steps=stop_after_steps, context=context)
        if not result.finished:
            return None
        # No wall time here (the stage runner keeps it in timings/): a re-run with the same weights must
        # write the same bytes, or DVC would re-run every stage downstream of an unchanged CLIP.
        info["pretrain"] = {"steps": result.steps_done, "final_loss": result.final_loss,
                            "logit_scale": result.logit_scale, "corpus": cfg.pretrain.corpus,
                            "images_per_epoch": len(pairs), "images_seen": result.steps_done * cfg.pretrain.batch_size}
    else:
        checkpointer = None
    if not context.is_main:  # rank 0 evaluates and writes; the others wait for its metrics
        return broadcast_from_main(run_on_main(context, dict), context)
    model = model.cpu().eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)

    # The reference: same architecture, random initialisation (seeded apart from the run's seed).
    torch.manual_seed(params.runtime.seed + 1)
    random_model = clip_from_config(clip_model_config(cfg, model)).eval()
    split = params.dataset.val_split
    quality, reference = evaluate_zero_shot([model, random_model], tokenizer, dataset, split, device)
    probe_split = params.dataset.scored_split  # the train split's scored images, as every train-split figure
    probe_ids = dataset.scored_ids(params.dataset.train_split, probe_split)
    probes, reference_probes = evaluate_dense_probes([model, random_model], tokenizer, dataset, probe_ids, device)
    probe, last_layer = probes["value_path"], probes["last_layer"]
    reference_probe, reference_last_layer = reference_probes["value_path"], reference_probes["last_layer"]
    metrics = {
        "source": cfg.source,
        "split": split,
        "n_images": quality["n_images"],
        "prompt": PROMPT_TEMPLATE,
        "zero_shot_map": quality["map"],
        "zero_shot_top1": quality["top1"],
        "random_init_map": reference["map"],
        "random_init_top1": reference["top1"],
        "per_class_ap": quality["per_class_ap"],
        "dense_probe_split": probe_split,
        "dense_probe_n_images": probe.n_images,
        "dense_probe_rule": PROBE_RULE,
        "dense_probe_threshold_chosen_with_gt": False,
        "dense_probe_miou": None if probe.report is None else probe.report.miou,
        "random_init_dense_probe_miou": None if reference_probe.report is None else reference_probe.report.miou,
        "last_layer_probe_rule": LAST_LAYER_PROBE_RULE,
        "last_layer_probe_miou": None if last_layer.report is None else last_layer.report.miou,
        "random_init_last_layer_probe_miou": (None if reference_last_layer.report is None
                                              else reference_last_layer.report.miou),
        **({"dense_probe_not_scored": NOT_SCORED_NO_GT} if probe.report is None else {}),
        **({"pretrain": info["pretrain"]} if "pretrain" in info else {}),
    }
    with atomic_dir(artifact_dir, ARTIFACT_CONTENTS) as temporary_dir:
        save_clip_artifact(temporary_dir, model.cpu(), cfg,
                           info={"zero_shot_map": quality["map"], "zero_shot_top1": quality["top1"], **info})
    write_json(metrics_path, metrics)
    if checkpointer is not None:
        checkpointer.clear()
    return broadcast_from_main(run_on_main(context, lambda: metrics), context)


def summary_line(params: Params, args: argparse.Namespace, context: DistributedContext) -> str | None:
    metrics = run(params, context=context)
    if metrics is None:
        return None
    return (f"clip ({metrics['source']}): zero-shot mAP {metrics['zero_shot_map']:.3f} "
            f"top-1 {metrics['zero_shot_top1']:.3f} on {metrics['split']} "
            f"(random init: mAP {metrics['random_init_map']:.3f}, top-1 {metrics['random_init_top1']:.3f}); "
            f"dense probe mIoU {probe_text(metrics['dense_probe_miou'])} on {metrics['dense_probe_split']} "
            f"(random init {probe_text(metrics['random_init_dense_probe_miou'])})"
            + (f"; {activation_note(params.clip.model_name)}" if params.clip.source == "file" else ""))


def activation_note(model_name: str) -> str:
    """Which activation ``clip.model_name`` builds: OpenAI's weights need QuickGELU, and a plain state dict of them
    (``clip.load(..., jit=False)``) carries no sign of it (the loader refuses the files that do)."""
    if named_model_config(model_name).get("quick_gelu", False):
        return f"{model_name} builds QuickGELU blocks (OpenAI's weights)"
    return (f"{model_name} builds GELU blocks (LAION's weights; OpenAI's need {model_name}-quickgelu, which "
            "nothing in a plain state dict of them says)")


def probe_text(miou: float | None) -> str:
    return "not scored: no GT" if miou is None else f"{miou:.3f}"


SPEC = StageSpec(name="clip", module="pipeline.clip", description=__doc__.splitlines()[0], run=summary_line,
                 global_batches=lambda params: ({"clip.pretrain.batch_size": params.clip.pretrain.batch_size}
                                                if params.clip.source == "pretrain" else {}))


def main(argv: list[str] | None = None) -> int | None:
    """Run the stage; with ``runtime.launcher: torchrun`` the pre-training runs as ``runtime.nproc`` DDP workers."""
    return run_stage(SPEC, argv)


if __name__ == "__main__":
    run_stage_cli(main, "clip")

"""Contrastive pre-training of a small open_clip model on image/caption pairs, and its zero-shot check.

On the synthetic benchmark no pretrained CLIP exists, so the ``clip`` stage
teaches a small one the dataset's vocabulary from its captions (CLIP's InfoNCE
with a learnable logit scale). ``zero_shot_report`` then measures whether that
knowledge is real: prompt scores "a photo of a {class}" against the images'
labels, as multi-label mAP and top-1 accuracy, to compare against a randomly
initialised CLIP.

The model is any open_clip ``CLIP``: ``encode_image``, ``encode_text`` and a
``logit_scale`` parameter (log of the inverse temperature).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from weakclip_core.config.clip import ClipPretrainConfig
from weakclip_core.data.layout import PreparedDataset
from weakclip_core.data.sampling import StepSampler
from weakclip_core.data.transforms import sample_rng, to_tensor
from weakclip_core.runtime.distributed import (DistributedContext, ShardedKeySampler, gather_objects, gather_with_grad,
                                               per_process_batch_size, single_process_context, wrap_model)
from weakclip_core.evaluation.metrics import average_precision
from weakclip_core.config.schema import ConfigError
from weakclip_core.training.checkpoint import Checkpointer
from weakclip_core.training.loop import LoopPlan, LoopState, run_training_loop
from weakclip_core.training.schedules import warmup_cosine_lr

PROMPT_TEMPLATE = "a photo of a {}"
# open_clip clamps the learnable logit scale at 100 (log 100 = 4.6052) to keep the softmax stable.
MAX_LOGIT_SCALE = math.log(100.0)

Tokenizer = Callable[[Sequence[str]], torch.Tensor]


def clip_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                          caption_groups: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE on a batch of matching pairs.

    ``image_features`` and ``text_features`` are (B, D), L2-normalised here;
    ``logit_scale`` is the (exponentiated) inverse temperature. Pair i is the
    positive of row i and column i. ``caption_groups`` (B,) optionally marks
    pairs whose captions are identical: those texts are all positives of each
    such image (the target mass is split evenly among them) instead of false
    negatives. Returns the mean of the image→text and text→image cross-entropies.
    """
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits_per_image = logit_scale * image_features @ text_features.T
    if caption_groups is None:
        targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
        return 0.5 * (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.T, targets))
    same_caption = (caption_groups[:, None] == caption_groups[None, :]).to(logits_per_image.dtype)
    targets = same_caption / same_caption.sum(dim=1, keepdim=True)
    image_to_text = -(targets * F.log_softmax(logits_per_image, dim=1)).sum(dim=1).mean()
    text_to_image = -(targets * F.log_softmax(logits_per_image.T, dim=1)).sum(dim=1).mean()
    return 0.5 * (image_to_text + text_to_image)


def light_augmentation(image: np.ndarray, size: int, rng: np.random.Generator,
                       min_area: float = 0.8) -> np.ndarray:
    """(H, W, 3) uint8 → (size, size, 3): a random crop of ``min_area``..1 of the area, resized, maybe flipped.

    Colours are left alone (captions may name them) and the crop keeps most of
    the image (captions name every object in it).
    """
    height, width = image.shape[:2]
    area = rng.uniform(min_area, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_height = min(height, max(1, int(round(math.sqrt(area / aspect) * height))))
    crop_width = min(width, max(1, int(round(math.sqrt(area * aspect) * width))))
    top = int(rng.integers(0, height - crop_height + 1))
    left = int(rng.integers(0, width - crop_width + 1))
    crop = Image.fromarray(image[top:top + crop_height, left:left + crop_width])
    result = np.asarray(crop.resize((size, size), Image.BICUBIC))
    if rng.random() < 0.5:
        result = result[:, ::-1]
    return np.ascontiguousarray(result)


def resize_for_clip(image: np.ndarray, size: int) -> torch.Tensor:
    """(H, W, 3) uint8 → (3, size, size) CLIP-normalised float tensor (evaluation: no randomness)."""
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    return to_tensor(image)


CLAUSE_SEPARATOR = re.compile(r",\s+|\s+and\s+|\s+on\s+|\s+with\s+")


def caption_clauses(caption: str) -> list[str]:
    """A caption cut at ", ", " and ", " on ", " with " into its clauses (object and context phrases)."""
    return [clause for clause in CLAUSE_SEPARATOR.split(caption.strip()) if clause]


def drop_clauses(caption: str, drop_probability: float, rng: np.random.Generator) -> str:
    """Keep each clause with probability 1 - ``drop_probability`` (at least one), joined by " and ".

    Why: a full caption is told apart from the batch's others by its easiest
    words (the background's), so the class words never have to carry meaning.
    Sub-captions such as "a red-headed grey heron" make each object phrase match
    the image on its own, which is what a prompt "a photo of a heron" asks.
    One uniform draw per clause, then one integer draw: a fixed number of draws.
    """
    clauses = caption_clauses(caption)
    if drop_probability <= 0.0 or len(clauses) < 2:
        return caption
    keep = rng.random(len(clauses)) >= drop_probability
    forced = int(rng.integers(len(clauses)))
    if not keep.any():
        keep[forced] = True
    return " and ".join(clause for clause, kept in zip(clauses, keep) if kept)


class CaptionPairs(Dataset):
    """Image/caption pairs of a prepared split, keyed by ``(epoch, index)`` from a ``StepSampler``.

    Returns ``(image (3, S, S), caption)``: the augmented image and its caption
    with clauses dropped at random (``caption_dropout``), both drawn from
    (seed, epoch, index). The training loop tokenises the batch's captions.
    """

    def __init__(self, dataset: PreparedDataset, image_ids: list[str], image_size: int, seed: int,
                 caption_dropout: float = 0.0) -> None:
        captions = dataset.captions()
        missing = [image_id for image_id in image_ids if image_id not in captions]
        if missing:
            raise ValueError(f"{dataset.root / 'captions.txt'}: {len(missing)} image(s) have no caption, "
                             f"e.g. {missing[0]}")
        self.dataset = dataset
        self.image_ids = list(image_ids)
        self.captions = [captions[image_id] for image_id in self.image_ids]
        self.image_size = image_size
        self.seed = seed
        self.caption_dropout = caption_dropout

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, str]:
        epoch, index = key
        rng = sample_rng(self.seed, epoch, index)
        image = self.dataset.image(self.image_ids[index])
        augmented = light_augmentation(image, self.image_size, rng)
        return to_tensor(augmented), drop_clauses(self.captions[index], self.caption_dropout, rng)


def caption_groups(captions: Sequence[str]) -> torch.Tensor:
    """(B,) ids with equal ids for identical captions (their texts are all positives of each such image)."""
    group_of_text: dict[str, int] = {}
    return torch.tensor([group_of_text.setdefault(text, len(group_of_text)) for text in captions],
                        dtype=torch.long)


def _decay_groups(model: nn.Module) -> list[dict[str, Any]]:
    """AdamW groups as in open_clip: no weight decay on gains, biases, embeddings' 1-D params and logit_scale."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        exclude = parameter.ndim < 2 or "logit_scale" in name or "positional_embedding" in name \
            or "class_embedding" in name
        (no_decay if exclude else decay).append(parameter)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


class ContrastivePair(nn.Module):
    """``forward(images, tokens)`` → (image features (b, D), text features (b, D), exp(logit_scale)).

    The one forward DDP can wrap: open_clip's ``CLIP`` trains through
    ``encode_image``/``encode_text``, which a DDP wrapper would not see.
    """

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.clip.encode_image(images), self.clip.encode_text(tokens), self.clip.logit_scale.exp()


@dataclass(frozen=True)
class PretrainResult:
    """What a pre-training run did: steps done, whether that is all of them, the last loss, the logit scale."""

    steps_done: int
    finished: bool
    final_loss: float
    logit_scale: float


def pretrain_clip(model: nn.Module, pairs: Dataset, tokenizer: Tokenizer, config: ClipPretrainConfig,
                  device: torch.device, checkpointer: Checkpointer, seed: int, stop_after_steps: int | None = None,
                  context: DistributedContext | None = None, show_progress: bool = True) -> PretrainResult:
    """Train ``model`` contrastively on ``pairs`` for ``config.epochs`` epochs; resumable.

    A checkpoint is written at the end of every epoch; a run with the same config resumes from it and,
    being deterministic per step, ends with the weights an uninterrupted run would have.
    ``stop_after_steps`` stops this call after that many steps as if the process were killed (tests of
    resumption).

    Under DDP (``context`` from torchrun; ``device`` is then the context's) each
    rank encodes its slice of every global batch (``clip.pretrain.batch_size``),
    the features and captions are gathered (with gradient) so every rank scores
    the whole N×N logits of the global batch, and only rank 0 checkpoints.
    """
    context = context or single_process_context(device)
    steps_per_epoch = len(pairs) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(f"clip.pretrain.batch_size: {config.batch_size} exceeds the {len(pairs)} training pairs")
    total_steps = steps_per_epoch * config.epochs
    model.to(device).train()
    optimizer = torch.optim.AdamW(_decay_groups(model), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.98), eps=1e-6)
    start_step, extra = checkpointer.resume(model, optimizer)
    sampler = StepSampler(len(pairs), config.batch_size, seed, total_steps, start_step)
    loader = DataLoader(pairs, batch_size=per_process_batch_size(config.batch_size, context, "clip.pretrain.batch_size"),
                        sampler=ShardedKeySampler(sampler, config.batch_size, context) if context.is_distributed
                        else sampler,
                        num_workers=config.workers, generator=torch.Generator().manual_seed(seed))
    pair_model = wrap_model(ContrastivePair(model), context)

    def compute_losses(step: int, batch: tuple[torch.Tensor, Sequence[str]]) -> dict[str, torch.Tensor]:
        images, captions = batch
        image_features, text_features, logit_scale = pair_model(images.to(device), tokenizer(captions).to(device))
        # One process: the batch itself. DDP: the global batch in rank order, as one process would hold it;
        # every rank computes the same loss, whose gradient reaches each rank's own rows (see gather_with_grad).
        all_captions = gather_objects(list(captions), context)
        return {"loss": clip_contrastive_loss(gather_with_grad(image_features, context),
                                              gather_with_grad(text_features, context), logit_scale,
                                              caption_groups(all_captions).to(device))}

    def clamp_logit_scale() -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    result = run_training_loop(
        name="clip pretrain", lr_key="clip.pretrain.lr",
        plan=LoopPlan(total_steps=total_steps, window_steps=steps_per_epoch, checkpoint_every=total_steps,
                      lr_at=lambda step: warmup_cosine_lr(step, total_steps, config.lr, config.warmup_steps)),
        batches=loader, start_step=start_step, model=pair_model, optimizer=optimizer,
        compute_losses=compute_losses, context=context, checkpointer=checkpointer, checkpointed_module=model,
        state=LoopState.from_dict(extra.get("loop")), after_step=clamp_logit_scale,
        stop_after_steps=stop_after_steps, show_progress=show_progress)
    return PretrainResult(steps_done=start_step + result.steps_this_run, finished=result.finished,
                          final_loss=result.last_losses.get("loss", float("nan")),
                          logit_scale=float(model.logit_scale.detach().exp()))


@torch.no_grad()
def zero_shot_scores(model: nn.Module, tokenizer: Tokenizer, image_batches: Iterable[torch.Tensor],
                     class_names: Sequence[str], device: torch.device,
                     template: str = PROMPT_TEMPLATE) -> torch.Tensor:
    """Batches of (b, 3, S, S) CLIP-normalised images → (N, C) cosine similarities to ``template.format(name)``."""
    return zero_shot_scores_of([model], tokenizer, image_batches, class_names, device, template)[0]


@torch.no_grad()
def zero_shot_scores_of(models: Sequence[nn.Module], tokenizer: Tokenizer, image_batches: Iterable[torch.Tensor],
                        class_names: Sequence[str], device: torch.device,
                        template: str = PROMPT_TEMPLATE) -> list[torch.Tensor]:
    """:func:`zero_shot_scores` of each of ``models``, the batches read once for all of them (the ``clip``
    stage scores the CLIP and its random reference; on COCO's 40,504 val images the reading is most of it)."""
    prompts = tokenizer([template.format(name) for name in class_names]).to(device)
    text_features = []
    for model in models:
        model.to(device).eval()
        text_features.append(F.normalize(model.encode_text(prompts), dim=-1))
    scores: list[list[torch.Tensor]] = [[] for _ in models]
    for images in image_batches:
        images = images.to(device)
        for model, texts, model_scores in zip(models, text_features, scores):
            model_scores.append((F.normalize(model.encode_image(images), dim=-1) @ texts.T).cpu())
    return [torch.cat(model_scores).float() for model_scores in scores]


def zero_shot_report(scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Multi-label quality of (N, C) prompt scores against (N, C) 0/1 image labels.

    ``map``: mean over classes (with at least one positive image) of the AP of
    ranking the images by that class's score (an image with no label is a negative for
    every class). ``top1``: fraction of the labelled images whose highest-scoring class is
    one of their labels (an image with none has no right answer; 0.0 when no image has one).
    """
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in shape")
    per_class = {name: average_precision(scores[:, c], labels[:, c]) for c, name in enumerate(class_names)}
    defined = [ap for ap in per_class.values() if ap is not None]
    labelled = labels.any(axis=1)
    hits = labels[np.arange(labels.shape[0]), scores.argmax(axis=1)].astype(bool)
    top1 = float(hits[labelled].mean()) if labelled.any() else 0.0
    return {"map": float(np.mean(defined)) if defined else 0.0, "top1": top1, "per_class_ap": per_class}

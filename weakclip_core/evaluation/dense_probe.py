"""A MaskCLIP-style dense probe: how well the frozen CLIP's patches align with the class prompts, as mIoU.

The zero-shot check of the ``clip`` stage scores whole images; WeakCLIP relies on something else, that
each *patch* lands near its class's text in the joint space. This probe measures that directly and
without training anything (Zhou et al., "Extract Free Dense Labels from CLIP", ECCV 2022):

1. **Patch embeddings by the value path** (:func:`value_path_embeddings`). The tokens that enter the
   visual tower's last block go through that block's ``ln_1``, the value slice of the attention's
   ``in_proj`` (``v = x W_v + b_v``) and its ``out_proj``, then ``ln_post`` and ``proj``. The query-key
   attention of the last block is skipped: it mixes every patch with the class token's global view, and
   its output is what the plain last-layer patch tokens carry. The value path is the paper's
   reformulation of the value embedding and the last linear layer as two 1x1 convolutions. (MaskCLIP's
   released ViT code also adds the block's residual and MLP to this path; the probe keeps the bare value
   path the paper describes: fewer parts, and each is a weight the test checks by hand.)
2. **Class text embeddings**: ``"a photo of a {name}"`` (the zero-shot check's ``PROMPT_TEMPLATE``) for
   every class of the dataset, the background included: ``class_names[0]`` is ``"background"`` by the
   layout contract, so background is its own prompt, ``"a photo of a background"``.
3. **Label map** (:func:`probe_label_map`): the cosine of each patch to each prompt, bilinearly upsampled
   to the GT mask's size, argmax over the image's labelled classes plus background. Restricting to the
   image-level labels is what WSSS probes do (the labels are known at train time); background wins
   where its prompt scores best. No threshold exists, so nothing is tuned on GT.

The mIoU is that of :mod:`weakclip_core.evaluation.metrics` (255 ignored, undefined classes left out).

A second reading (``tokens="last_layer"``, :func:`last_layer_patch_embeddings`) takes the plain last-layer
patch tokens through ``ln_post`` and ``proj`` instead: the tokens WeakCLIP's matching reads
(``dense_visual_features``). MaskCLIP's point is that on a real CLIP these align worse than the value path;
on a CLIP trained here they are what a dense objective would train, so both are recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weakclip_core.data.layout import PreparedDataset
from weakclip_core.evaluation.metrics import ConfusionAccumulator, IouReport
from weakclip_core.models.clip import dense_visual_features, visual_input_tokens
from weakclip_core.training.clip_pretrain import PROMPT_TEMPLATE, resize_for_clip

PROBE_RULE = ("MaskCLIP value path of the last block -> ln_post -> proj; cosine to 'a photo of a {class}' "
              "(background: 'a photo of a background'), bilinear to the mask, argmax over the image's labels "
              "+ background; no threshold")
"""The one-line description of the probe recorded beside its figures in ``metrics/clip.json``."""
LAST_LAYER_PROBE_RULE = ("the last block's output patch tokens -> ln_post -> proj (the tokens WeakCLIP's matching "
                         "reads); otherwise as the value-path probe")
ProbeTokens = Literal["value_path", "last_layer"]

Tokenizer = Callable[[Sequence[str]], torch.Tensor]


def value_path_embeddings(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, embed_dim, grid_h, grid_w) joint-space patch embeddings of (B, 3, H, W) CLIP-normalised images.

    The last block's value path (module docstring): ``proj(ln_post(out_proj(W_v ln_1(x) + b_v)))`` for
    each patch token ``x`` entering that block; the class token and the query-key attention play no part.
    Works for open_clip's ``VisionTransformer`` whose blocks hold an ``nn.MultiheadAttention`` with a
    packed ``in_proj_weight`` (every OpenAI / open_clip ViT CLIP); anything else is a ``ValueError``.
    """
    blocks = visual.transformer.resblocks
    last = blocks[-1]
    attention = getattr(last, "attn", None)
    if not isinstance(attention, nn.MultiheadAttention) or attention.in_proj_weight is None:
        raise ValueError("the dense probe needs the visual tower's last block to hold an nn.MultiheadAttention "
                         "with a packed in_proj_weight (open_clip's ResidualAttentionBlock)")
    tokens, grid_h, grid_w = visual_input_tokens(visual, images)
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        tokens = tokens.transpose(0, 1)
    for block in blocks[:-1]:
        tokens = block(tokens)
    if not batch_first:
        tokens = tokens.transpose(0, 1)
    width = attention.embed_dim
    # nn.MultiheadAttention packs [W_q; W_k; W_v] into in_proj_weight (3 * width, width), biases alike.
    value_weight = attention.in_proj_weight[2 * width:]
    value_bias = None if attention.in_proj_bias is None else attention.in_proj_bias[2 * width:]
    values = F.linear(last.ln_1(tokens[:, 1:]), value_weight, value_bias)
    # ls_1 (LayerScale) scales the attention branch's output; identity in every CLIP without layer scale.
    projected = visual.ln_post(last.ls_1(attention.out_proj(values)))
    if visual.proj is not None:
        projected = projected @ visual.proj
    return projected.transpose(1, 2).reshape(images.shape[0], -1, grid_h, grid_w)


def last_layer_patch_embeddings(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, embed_dim, grid_h, grid_w): the last block's output patch tokens through ``ln_post`` and ``proj``,
    every block's query-key attention kept: what WeakCLIP's matching compares with the class texts."""
    return dense_visual_features(visual, images, []).patch_embeddings


@torch.no_grad()
def class_text_embeddings(model: nn.Module, tokenizer: Tokenizer, class_names: Sequence[str],
                          device: torch.device) -> torch.Tensor:
    """(K, embed_dim) L2-normalised embeddings of ``PROMPT_TEMPLATE`` for every class, background (0) included."""
    prompts = tokenizer([PROMPT_TEMPLATE.format(name) for name in class_names]).to(device)
    return F.normalize(model.encode_text(prompts).float(), dim=-1)


def probe_label_map(patch_embeddings: torch.Tensor, text_embeddings: torch.Tensor, image_labels: Sequence[int],
                    shape: tuple[int, int]) -> np.ndarray:
    """(H, W) int64 class indices of one image from its (D, grid_h, grid_w) patch embeddings.

    ``text_embeddings`` (K, D) are L2-normalised, row k = class k. Each patch's cosine to background (0)
    and to each class in ``image_labels`` is bilinearly upsampled (``align_corners=False``) to ``shape``;
    each pixel takes the best of those candidates (ties: the lower class index).
    """
    candidates = [0] + sorted(int(label) for label in set(image_labels) if label != 0)
    patches = F.normalize(patch_embeddings.float(), dim=0)
    cosines = torch.einsum("dhw,kd->khw", patches, text_embeddings[candidates].float())
    upsampled = F.interpolate(cosines[None], size=shape, mode="bilinear", align_corners=False)[0]
    # numpy's argmax: torch's over the leading dim of a (K, H, W) tensor is an order of magnitude slower on CPU.
    return np.asarray(candidates, dtype=np.int64)[upsampled.cpu().numpy().argmax(axis=0)]


@dataclass(frozen=True)
class DenseProbeResult:
    """The probe's IoU report over the scored images (``None`` when none has a GT mask) and their count."""

    report: IouReport | None
    n_images: int


@torch.no_grad()
def dense_probes(model: nn.Module, tokenizer: Tokenizer, dataset: PreparedDataset, image_ids: Sequence[str],
                 device: torch.device, readings: Sequence[ProbeTokens],
                 batch_size: int = 32) -> dict[ProbeTokens, DenseProbeResult]:
    """Score the probe of ``model`` (an open_clip ``CLIP``) on the images of ``image_ids`` that have a GT mask,
    once per reading of the patches in ``readings`` (the value path, the last layer's tokens: module docstring),
    in one pass over the images and masks: :func:`dense_probes_of` with the one model."""
    return dense_probes_of([model], tokenizer, dataset, image_ids, device, readings, batch_size)[0]


@torch.no_grad()
def dense_probes_of(models: Sequence[nn.Module], tokenizer: Tokenizer, dataset: PreparedDataset,
                    image_ids: Sequence[str], device: torch.device, readings: Sequence[ProbeTokens],
                    batch_size: int = 32) -> list[dict[ProbeTokens, DenseProbeResult]]:
    """:func:`dense_probes` of each of ``models`` (of one input size), in one pass: each image and mask is read
    and resized once for all of them (the ``clip`` stage probes the CLIP and its random reference; on COCO's
    82,081 train images the reading is most of the time).

    Each image is resized to the CLIP's own input size (as the zero-shot check does), the label map is
    made at the mask's size (:func:`probe_label_map`) and compared with the mask, 255 ignored.
    """
    sizes = {int(model.visual.image_size[0]) for model in models}
    if len(sizes) != 1:
        raise ValueError(f"dense_probes_of: the models take different input sizes {sorted(sizes)}")
    size = sizes.pop()
    text_embeddings = []
    for model in models:
        model.to(device).eval()
        text_embeddings.append(class_text_embeddings(model, tokenizer, dataset.class_names, device))
    scored = [image_id for image_id in image_ids if dataset.has_mask(image_id)]
    confusions = [{reading: ConfusionAccumulator(dataset.n_classes) for reading in readings} for _ in models]
    for start in range(0, len(scored), batch_size):
        batch_ids = scored[start:start + batch_size]
        images = [dataset.image(image_id) for image_id in batch_ids]
        masks = [dataset.checked_mask(image_id, image.shape[:2]) for image_id, image in zip(batch_ids, images)]
        labels = [dataset.image_labels(image_id) for image_id in batch_ids]
        inputs = torch.stack([resize_for_clip(image, size) for image in images]).to(device)
        for model, texts, model_confusions in zip(models, text_embeddings, confusions):
            for reading, confusion in model_confusions.items():
                embeddings = (value_path_embeddings(model.visual, inputs) if reading == "value_path"
                              else last_layer_patch_embeddings(model.visual, inputs))
                for image_labels, mask, patch_embeddings in zip(labels, masks, embeddings):
                    confusion.add(mask, probe_label_map(patch_embeddings, texts, image_labels, mask.shape))
    return [{reading: DenseProbeResult(report=confusion.report() if scored else None, n_images=len(scored))
             for reading, confusion in model_confusions.items()} for model_confusions in confusions]


def dense_probe(model: nn.Module, tokenizer: Tokenizer, dataset: PreparedDataset, image_ids: Sequence[str],
                device: torch.device, batch_size: int = 32, tokens: ProbeTokens = "value_path") -> DenseProbeResult:
    """:func:`dense_probes` with the one reading ``tokens``."""
    return dense_probes(model, tokenizer, dataset, image_ids, device, (tokens,), batch_size)[tokens]

"""The ``weakclip`` section: the WeakCLIP model, its seeds, losses and training schedule.

The model itself is built from ``WeakClipArchConfig`` (``WeakClipConfig.arch()``):
the architecture fields only, so the network never sees seeds, losses or the
training schedule. The architecture defaults are the paper's numbers, taken
from ``weakclip_core.config.paper``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal

from weakclip_core.config import paper
from weakclip_core.config.schema import NONE_PATH, ConfigError, bounded, check_order, given_path, listed


@dataclass(frozen=True)
class CrfConfig:
    """Dense CRF settings (pydensecrf): Gaussian and bilateral kernels."""

    iterations: int = bounded(10, low=1)
    gaussian_sxy: float = bounded(3.0, low=0.0)
    gaussian_compat: float = bounded(3.0, low=0.0)
    bilateral_sxy: float = bounded(80.0, low=0.0)
    bilateral_srgb: float = bounded(13.0, low=0.0)
    bilateral_compat: float = bounded(10.0, low=0.0)


@dataclass(frozen=True)
class SeedConfig:
    """How CAMs become training seeds: confident thresholds (paper) or dense argmax (ablation).

    ``chosen_with_gt``: set true when the thresholds were picked by looking at
    ground truth (e.g. cam.json's best threshold or a seed-mIoU sweep); the
    stage copies it into ``metrics/weakclip.json`` as ``thresholds_chosen_with_gt``.
    ``source: mask_folder`` trains on ``mask_folder``'s pseudo-mask PNGs instead (``<id>.png`` per train image,
    class indices, 255 unlabelled: e.g. the MCTformer masks the reference trains WeakCLIP on); the thresholds
    are then unused. ``mask_folder`` is a dvc.yaml dep; ``imports/none`` = not given; a folder of GT masks is
    refused (weak supervision never trains on GT by accident). ``source: gt`` trains on the prepared GT masks on
    purpose: an upper bound that uses GT (how far a frozen CLIP can take WeakCLIP), never a WSSS result; the
    metrics and every figure downstream say so.
    """

    mode: Literal["confident", "dense"] = "confident"
    fg_threshold: float = bounded(0.4, low=0.0, high=1.0)
    bg_threshold: float = bounded(0.15, low=0.0, high=1.0)
    chosen_with_gt: bool = False
    source: Literal["cams", "mask_folder", "gt"] = "cams"
    mask_folder: str = NONE_PATH

    def validate(self) -> None:
        check_order("bg_threshold", self.bg_threshold, "fg_threshold", self.fg_threshold)
        if self.source == "mask_folder" and given_path(self.mask_folder) is None:
            raise ConfigError("mask_folder: required when source is 'mask_folder' (a folder of pseudo-mask "
                              f"PNGs, <id>.png per train image), got {self.mask_folder!r}")


@dataclass(frozen=True)
class WeakClipLossConfig:
    """total = seed + boundary_weight * boundary + aux_weight * aux, on P resized to ``loss_size``."""

    boundary_weight: float = bounded(1.0, low=0.0)
    aux_weight: float = bounded(0.4, low=0.0)
    aux_temperature: float = bounded(0.07, low=1e-4)
    loss_size: int = bounded(64, low=8)
    # the reference (dgcn_cal_seeding_loss): per image, mean -log p over its background seeds plus mean -log p
    # over its foreground seeds, averaged over the batch; "pooled_mean": the two means pooled over the batch, averaged
    seed_loss_reduction: Literal["per_image_sum", "pooled_mean"] = "per_image_sum"
    # the auxiliary cross-entropy: "matching_size": the seeds resized (nearest) to λ's grid, a mean over the seed
    # pixels; "reference": λ'/τ upsampled (bilinear) to the seeds' size, a mean over every pixel, ignored ones
    # counting 0 (the reference's mmseg 0.19 IdentityHead + CrossEntropyLoss)
    aux_form: Literal["matching_size", "reference"] = "matching_size"
    ratio_min: float = bounded(0.05, low=0.0)
    ratio_max: float = bounded(20.0, low=1.0)
    crf_workers: int = bounded(2, low=0)
    crf: CrfConfig = field(default_factory=CrfConfig)

    def validate(self) -> None:
        check_order("ratio_min", self.ratio_min, "ratio_max", self.ratio_max)


@dataclass(frozen=True)
class WeakClipTrainConfig:
    """AdamW, linear warm-up then cosine to ``min_lr``; the paper's augmentations scaled to ``crop``."""

    iterations: int = bounded(600, low=1)
    batch_size: int = bounded(16, low=1)
    lr: float = bounded(1e-4, low=0.0)
    min_lr: float = bounded(1e-6, low=0.0)
    weight_decay: float = bounded(3e-5, low=0.0)
    warmup_iterations: int = bounded(50, low=0)
    crop: int = bounded(128, low=16)
    scale_min: float = bounded(0.5, low=0.1)
    scale_max: float = bounded(2.0, low=0.1)
    checkpoint_every: int = bounded(100, low=1)
    workers: int = bounded(0, low=0)
    # mmseg Resize(img_scale, ratio_range=(scale_min, scale_max), keep_ratio): [long, short] base the ratio
    # multiplies ([2048, 512] in the reference); [] = the image's own size
    img_scale: list[int] = listed([], low=1)
    cat_max_ratio: float = bounded(0.75, low=0.01, high=1.0)  # mmseg RandomCrop; 1 = off
    hue_delta: int = bounded(18, low=0, high=90)  # mmseg PhotoMetricDistortion, OpenCV hue units (2 degrees)
    prompt_init_std: float = bounded(1.0, low=0.0)  # trunc_normal_ std of the context vectors (reference 1.0)
    clip_drop_path_rate: float = bounded(0.1, low=0.0, high=0.9)  # stochastic depth on the frozen CLIP
                                                                  # visual encoder while training
    # what one draw of that stochastic depth drops: a whole image's residual branch ("image", timm's per-sample
    # rule) or one token position's in every image of the batch ("token": the reference, whose blocks see
    # (L, N, D) tokens, so timm's drop_path draws over the token axis)
    clip_drop_path_unit: Literal["image", "token"] = "image"
    # "warmup_cosine": linear warm-up to lr, then a cosine to min_lr over the remaining iterations;
    # "mmcv_cosine": the reference's mmcv CosineAnnealing over all iterations from step 0, its first
    # warmup_iterations multiplied by the linear warm-up factor (warmup_ratio 1e-6 + (1 - 1e-6) * step / warm-up)
    lr_schedule: Literal["warmup_cosine", "mmcv_cosine"] = "warmup_cosine"
    # the decoder's convolutions: PyTorch's default initialisation, or the reference's (its mmcv ConvModules'
    # Kaiming-normal fan-out, bias 0; the classifier keeps PyTorch's default there too)
    decoder_init: Literal["torch_default", "reference"] = "torch_default"
    # added to runtime.seed for this stage only (init of the trainable parts, batch order, augmentation,
    # dropout): varies WeakCLIP's own training noise with the CLIP and the CAM seeds fixed (bench.ablations --seeds)
    seed_offset: int = bounded(0, low=0)

    def validate(self) -> None:
        check_order("scale_min", self.scale_min, "scale_max", self.scale_max)
        check_order("warmup_iterations", self.warmup_iterations, "iterations", self.iterations,
                    "the lr would never reach lr; lower warmup_iterations or train more iterations")
        if len(self.img_scale) not in (0, 2):
            raise ConfigError(f"img_scale: expected [] or [long, short], got {self.img_scale}")


@dataclass(frozen=True)
class WeakClipArchConfig:
    """What WeakCLIP's construction and forward read, and nothing else.

    Prompts (``prompt_len`` contexts in a ``text_context_length`` sequence),
    the ViT blocks tapped for the pyramid (``taps``, 4 of them), the
    co-attention (on/off, width x heads x layers, α/β init
    ``temperature_init``), the decoder's FPN neck and semantic-FPN head widths
    (``head_width`` is the head's conv width, not an attention head's), and
    the dropout of the co-attention and before the classifier. The field
    names and order are those of ``WeakClipConfig``.
    """

    prompt_len: int
    text_context_length: int
    temperature_init: float
    taps: tuple[int, ...]
    co_attention: bool
    co_attention_width: int
    co_attention_heads: int
    co_attention_layers: int
    neck_width: int
    head_width: int
    dropout: float

    def __post_init__(self) -> None:
        if len(self.taps) != 4:
            raise ConfigError(f"taps: expected 4 block indices (1/4, 1/8, 1/16, 1/32), got {len(self.taps)}")
        if self.co_attention_width % self.co_attention_heads:
            raise ConfigError(f"co_attention_width: {self.co_attention_width} is not divisible by "
                              f"co_attention_heads {self.co_attention_heads}")
        if self.text_context_length - self.prompt_len < 2:  # the prompt learner's own rule, checked before any stage
            raise ConfigError(f"text_context_length: {self.text_context_length} leaves "
                              f"{self.text_context_length - self.prompt_len} token(s) for the class names after "
                              f"prompt_len {self.prompt_len} prompt contexts; they need at least 2: raise "
                              "text_context_length or lower prompt_len")


@dataclass(frozen=True)
class WeakClipConfig:
    """The model's architecture (defaults: the paper's, from ``weakclip_core.config.paper``), then the
    seeds, losses and training schedule. ``arch()`` is the part the model is built from."""

    prompt_len: int = bounded(paper.PROMPT_LEN, low=1, high=64)
    text_context_length: int = bounded(paper.TEXT_CONTEXT_LENGTH, low=4)
    temperature_init: float = bounded(paper.TEMPERATURE_INIT, low=0.0)
    taps: list[int] = listed(list(paper.TAPS), low=0)
    co_attention: bool = paper.CO_ATTENTION
    co_attention_width: int = bounded(paper.CO_ATTENTION_WIDTH, low=8)
    co_attention_heads: int = bounded(paper.CO_ATTENTION_HEADS, low=1)
    co_attention_layers: int = bounded(paper.CO_ATTENTION_LAYERS, low=1)
    neck_width: int = bounded(paper.NECK_WIDTH, low=8)
    head_width: int = bounded(paper.HEAD_WIDTH, low=8)
    dropout: float = bounded(paper.DROPOUT, low=0.0, high=1.0)
    seeds: SeedConfig = field(default_factory=SeedConfig)
    loss: WeakClipLossConfig = field(default_factory=WeakClipLossConfig)
    train: WeakClipTrainConfig = field(default_factory=WeakClipTrainConfig)

    def arch(self) -> WeakClipArchConfig:
        """The architecture fields alone: what ``WeakCLIP`` is built from."""
        values = {item.name: getattr(self, item.name) for item in fields(WeakClipArchConfig)}
        return WeakClipArchConfig(**{**values, "taps": tuple(self.taps)})

    def with_arch(self, arch: WeakClipArchConfig) -> WeakClipConfig:
        """This config with its architecture fields taken from ``arch``; seeds, losses and training kept."""
        values = {item.name: getattr(arch, item.name) for item in fields(WeakClipArchConfig)}
        return replace(self, **{**values, "taps": list(arch.taps)})

    def validate(self) -> None:
        self.arch()  # the architecture's own checks (4 taps, width divisible by heads)


def paper_weakclip_arch() -> WeakClipArchConfig:
    """The paper's full-size architecture at ViT-B/16 (21.24M trainable of 171.46M at K = 21)."""
    return WeakClipConfig().arch()


def paper_weakclip_config(base: WeakClipConfig | None = None) -> WeakClipConfig:
    """``base`` (default: ``WeakClipConfig()``) with the paper's architecture; its seeds, losses and
    training settings are kept."""
    return (base or WeakClipConfig()).with_arch(paper_weakclip_arch())

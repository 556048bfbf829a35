"""The fully-supervised segmenter retrained on pseudo masks (or GT): smp DeepLabV3+ or SegFormer, or
DeepLabV2 (``deeplabv2.py``: torchvision ResNet-101 at output stride 8 + ASPP, the WSSS tables' retraining).

DeepLabV3+ takes ResNet encoders (``resnet18``/``resnet50``/``tu-…``), SegFormer the MiT encoders
(``mit_b0``..``mit_b5``). ImageNet encoder weights cannot be downloaded here: ``seg.encoder_weights``
names a local state-dict file (torchvision/timm layout, optionally under ``state_dict``/``model`` and
with an ``encoder.`` or ``module.`` prefix); empty means random initialisation. The model maps
(B, 3, H, W) ImageNet-normalised images to (B, K, H, W) logits (H, W multiples of 32).
"""

from __future__ import annotations

from weakclip_core.errors import InputError
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from weakclip_core.config.schema import build_dataclass, given_path, to_plain
from weakclip_core.config.seg import SegConfig
from weakclip_core.models.deeplabv2 import DeepLabV2
from weakclip_core.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from weakclip_core.artifacts.state_dict import unwrap_state_dict
from weakclip_core.artifacts.model_file import load_torch_file

SEGMENTER_MEAN = IMAGENET_MEAN
SEGMENTER_STD = IMAGENET_STD


class SegmenterWeightsError(InputError):
    """An encoder weights file or a saved segmenter that is missing or does not fit; names the file."""


def build_segmenter(cfg: SegConfig, n_classes: int, encoder_weights: bool = True) -> nn.Module:
    """smp model of ``cfg.model`` with ``n_classes`` outputs; loads ``cfg.encoder_weights`` when set
    and ``encoder_weights`` is true (a saved segmenter is rebuilt with ``encoder_weights=False``)."""
    if cfg.model == "deeplabv3plus":
        model: nn.Module = smp.DeepLabV3Plus(encoder_name=cfg.encoder, encoder_weights=None, classes=n_classes)
    elif cfg.model == "segformer":
        model = smp.Segformer(encoder_name=cfg.encoder, encoder_weights=None, classes=n_classes)
    elif cfg.model == "deeplabv2":
        model = DeepLabV2(n_classes, cfg.encoder)
    else:  # the config schema only admits these families
        raise ValueError(f"unknown model family {cfg.model!r} (deeplabv3plus | segformer | deeplabv2)")
    if cfg.train.freeze_encoder_bn:  # before the weights: FrozenBatchNorm2d loads BatchNorm2d's keys
        freeze_batch_norm(model.encoder)
    if encoder_weights and given_path(cfg.encoder_weights):
        load_encoder_weights(model, cfg.encoder_weights)
    return model


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` under ``module`` by a ``FrozenBatchNorm2d`` holding its statistics and
    affine weights as buffers: the same output as the BatchNorm in eval mode, in train mode too, and nothing for
    the optimizer or DDP to update (``seg.train.freeze_encoder_bn``). Returns ``module``, changed in place."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                if child.affine:
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                if child.running_mean is not None and child.running_var is not None:
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batch_norm(child)
    return module


def load_encoder_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local encoder state dict into ``model.encoder`` (classifier heads are dropped); a file
    that is missing, unreadable or of another architecture raises ``SegmenterWeightsError``."""
    path = Path(path)
    if not path.is_file():
        raise SegmenterWeightsError(f"{path} not found (ImageNet weights must be a local file here; "
                                    "leave the setting empty for random initialisation)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SegmenterWeightsError(f"{path} is not a torch state dict ({error})") from None
    unwrapped = unwrap_state_dict(state, extra_prefixes=("encoder.",))
    if unwrapped is None:
        raise SegmenterWeightsError(f"{path} holds a {type(state).__name__}, not a state dict")
    state = {key: value for key, value in unwrapped.items()
             if not key.startswith(("fc.", "head.", "classifier."))}
    try:
        model.encoder.load_state_dict(state)
    except RuntimeError as error:
        raise SegmenterWeightsError(f"{path} does not fit the encoder: {str(error)[:500]}") from None


def parameter_groups(model: nn.Module, head_lr_mult: float) -> list[dict[str, Any]] | Any:
    """The optimizer's parameters: one group when ``head_lr_mult`` is 1, else the encoder at lr and
    everything else (decoder, ASPP / segmentation head) at ``lr * head_lr_mult`` (``lr_scale``, which
    ``training.schedules.set_lr`` applies)."""
    if head_lr_mult == 1.0:
        return model.parameters()
    encoder_ids = {id(parameter) for parameter in model.encoder.parameters()}
    return [{"params": [p for p in model.parameters() if id(p) in encoder_ids], "lr_scale": 1.0},
            {"params": [p for p in model.parameters() if id(p) not in encoder_ids], "lr_scale": head_lr_mult}]


def training_config(cfg: SegConfig) -> dict[str, Any]:
    """The ``seg`` section without ``eval``: what training reads. The model file and the training checkpoint's
    identity hold this, so an evaluation setting (``seg.eval``) never changes a trained model's bytes nor
    throws away a checkpoint."""
    seg = to_plain(cfg)
    seg.pop("eval")
    return seg


def segmenter_record(cfg: SegConfig, class_names: list[str]) -> dict[str, Any]:
    """What ``artifacts/seg/<source>/model.pt`` stores besides the weights, to rebuild the model."""
    seg = training_config(cfg)
    seg["encoder_weights"] = given_path(cfg.encoder_weights) or ""  # "none" recorded as before the placeholder
    if cfg.train.head_lr_mult == 1.0:  # recorded only when used: a default run's file stays byte for byte as before
        seg["train"].pop("head_lr_mult")
    if not cfg.train.freeze_encoder_bn:  # likewise (and a file from before it rebuilds with trained BatchNorm)
        seg["train"].pop("freeze_encoder_bn")
    return {"seg": seg, "class_names": list(class_names),
            "mean": list(SEGMENTER_MEAN), "std": list(SEGMENTER_STD)}


def load_segmenter(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a segmenter saved with ``save_final_model(path, model, segmenter_record(...), ...)``.

    Returns the model in eval mode on the CPU and the whole saved dict minus the weights.
    """
    path = Path(path)
    if not path.is_file():
        raise SegmenterWeightsError(f"{path}: trained segmenter not found (run the seg_train stage)")
    saved = load_torch_file(path, "trained segmenter")  # weights_only: a planted payload never runs
    try:
        record = saved["config"]
        cfg = build_dataclass(SegConfig, record["seg"], "seg")
        model = build_segmenter(cfg, len(record["class_names"]), encoder_weights=False)
        model.load_state_dict(saved["model"])
    except (KeyError, TypeError, RuntimeError) as error:
        raise SegmenterWeightsError(f"{path}: not a saved segmenter ({str(error)[:300]})") from None
    return model.eval(), {key: value for key, value in saved.items() if key != "model"}

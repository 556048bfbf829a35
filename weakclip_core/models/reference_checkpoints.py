"""Released checkpoints of the reference code, loaded into our models (issue #18, item 3).

**MCTformer-V2** (xulianuwa/MCTformer, ``models.py`` of the V2 release: ``MCTformerV2(VisionTransformer)``,
``deit_small_MCTformerV2_patch16_224``; ``main.py`` saves ``{"model": state_dict, ...}``). The key layout,
read from those module definitions (timm-style ``VisionTransformer`` in its ``vision_transformer.py``):

=============================================  ======================================  ========================
reference key                                  shape (DeiT-S: D 384, C classes, N 196)  ours
=============================================  ======================================  ========================
``cls_token``                                  (1, C, D)                               ``cls_token``
``pos_embed``                                  (1, C + N, D) (class slots first)       ``pos_embed``
``patch_embed.proj.{weight,bias}``             (D, 3, 16, 16), (D,)                    same
``blocks.<i>.norm1.{weight,bias}``             (D,)                                    same
``blocks.<i>.attn.qkv.{weight,bias}``          (3D, D), (3D,)  (``qkv_bias=True``)     same
``blocks.<i>.attn.proj.{weight,bias}``         (D, D), (D,)                            same
``blocks.<i>.norm2.{weight,bias}``             (D,)                                    same
``blocks.<i>.mlp.fc1.{weight,bias}``           (4D, D), (4D,)                          same
``blocks.<i>.mlp.fc2.{weight,bias}``           (D, 4D), (D,)                           same
``norm.{weight,bias}``                         (D,)                                    dropped: the base ViT's
                                                                                       final norm, which
                                                                                       ``MCTformerV2.forward``
                                                                                       never applies
``head.{weight,bias}``                         (C, D, 3, 3), (C,)  (the PatchCAM conv)  ``patch_head.*``
=============================================  ======================================  ========================

The forward passes agree: class logits = mean over channels of the final class tokens, patch logits = global
average pool of the PatchCAM conv, the position embedding resized bicubically for other grids.
A checkpoint of another layout or architecture raises ``ReferenceCheckpointError`` naming the file and
the first keys that do not fit.
"""

from __future__ import annotations

import math

from pathlib import Path
from typing import Any

import torch

from weakclip_core.artifacts.model_file import load_torch_file
from weakclip_core.artifacts.state_dict import unwrap_state_dict
from weakclip_core.errors import InputError
from weakclip_core.models.mctformer import MCTformerV2

MCTFORMER_V2_RENAMED = {"head.weight": "patch_head.weight", "head.bias": "patch_head.bias"}
MCTFORMER_V2_UNUSED = ("norm.weight", "norm.bias")
MCTFORMER_V2_BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                           "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                           "mlp.fc2.weight", "mlp.fc2.bias")


class ReferenceCheckpointError(InputError):
    """A released checkpoint is missing, unreadable, or of another architecture or layout; names the file."""


def mctformer_v2_reference_keys(depth: int) -> list[str]:
    """Every key of the reference MCTformer-V2 state dict, from its module definitions (not from ours)."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    keys += [f"blocks.{index}.{key}" for index in range(depth) for key in MCTFORMER_V2_BLOCK_KEYS]
    return keys + list(MCTFORMER_V2_UNUSED) + list(MCTFORMER_V2_RENAMED)


def _shape_error(path: Path, message: str) -> ReferenceCheckpointError:
    return ReferenceCheckpointError(f"{path}: not an MCTformer-V2 checkpoint ({message})")


def mctformer_v2_from_reference(state: dict[str, Any], path: Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Our state dict and architecture (n_classes, width, depth, patch_size, image_size) from a reference one."""
    if not isinstance(state.get("cls_token"), torch.Tensor) or state["cls_token"].ndim != 3:
        raise _shape_error(path, "no (1, C, D) 'cls_token'" + (
            f"; its keys start {sorted(state)[:3]}" if state else "; it is empty"))
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    expected = set(mctformer_v2_reference_keys(depth))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise _shape_error(path, f"missing keys {missing[:4]}, unexpected keys {unexpected[:4]}")
    _, n_classes, width = state["cls_token"].shape
    patch_weight = state["patch_embed.proj.weight"]
    n_patches = state["pos_embed"].shape[1] - n_classes
    grid = math.isqrt(n_patches)
    if grid * grid != n_patches or patch_weight.shape[1:] != (3, patch_weight.shape[2], patch_weight.shape[2]):
        raise _shape_error(path, f"pos_embed {tuple(state['pos_embed'].shape)} / patch_embed "
                                 f"{tuple(patch_weight.shape)} do not make a square patch grid")
    if tuple(state["head.weight"].shape) != (n_classes, width, 3, 3):
        raise _shape_error(path, f"head.weight is {tuple(state['head.weight'].shape)}, expected the PatchCAM conv "
                                 f"({n_classes}, {width}, 3, 3) (an MCTformer-V1 or a classifier checkpoint?)")
    ours = {MCTFORMER_V2_RENAMED.get(key, key): value for key, value in state.items() if key not in MCTFORMER_V2_UNUSED}
    arch = {"n_classes": n_classes, "width": width, "depth": depth, "patch_size": patch_weight.shape[2],
            "image_size": grid * patch_weight.shape[2], "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / width}
    return ours, arch


def read_reference_state(path: Path, what: str) -> dict[str, Any]:
    """The state dict of a released checkpoint (``what``: e.g. ``MCTformer-V2 checkpoint``), read safely
    (``load_torch_file``) and unwrapped; ``ReferenceCheckpointError`` naming the file when it is missing or holds
    no state dict."""
    if not path.is_file():
        raise ReferenceCheckpointError(f"{path}: {what} not found")
    checkpoint = load_torch_file(path, what)
    state = unwrap_state_dict(checkpoint)
    if state is None:
        raise ReferenceCheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a state dict")
    return state


DEIT_HEADS = {192: 3, 384: 6, 768: 12}  # DeiT-Ti / -S / -B width -> its heads (64 wide each)


def load_reference_mctformer(path: str | Path, heads: int = 6) -> MCTformerV2:
    """Our ``MCTformerV2`` (eval mode, CPU) holding a released MCTformer-V2 checkpoint, loaded strictly.
    ``heads`` is not in the state dict's shapes (DeiT-S: 6); everything else is read from them."""
    path = Path(path)
    ours, arch = mctformer_v2_from_reference(read_reference_state(path, "MCTformer-V2 checkpoint"), path)
    if arch["width"] % heads:
        raise _shape_error(path, f"width {arch['width']} does not divide into {heads} heads")
    deit_heads = DEIT_HEADS.get(arch["width"])
    if deit_heads is not None and heads != deit_heads:  # nothing in the shapes says it: a wrong count loads
        raise ReferenceCheckpointError(  # silently and changes every attention map
            f"cam.arch.heads: {heads}, but {path} is {arch['width']} wide, a DeiT size whose blocks have "
            f"{deit_heads} heads of 64 (the released MCTformer-V2 checkpoints: DeiT-S, 6): set cam.arch.heads: "
            f"{deit_heads}")
    model = MCTformerV2(arch["n_classes"], image_size=arch["image_size"], patch_size=arch["patch_size"],
                        width=arch["width"], depth=arch["depth"], heads=heads, mlp_ratio=arch["mlp_ratio"],
                        drop_path=0.0)
    try:
        model.load_state_dict(ours, strict=True)
    except RuntimeError as error:
        raise _shape_error(path, str(error).splitlines()[0][:300]) from None
    return model.eval()

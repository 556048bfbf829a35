"""MCTformer-V2: a ViT with one class token per foreground class plus a PatchCAM branch.

Why our own blocks: timm's fused attention never materialises the attention
matrix, and the CAMs need it (class-to-patch attention, patch-to-patch
affinity). Parameter names follow timm's DeiT (``patch_embed.proj``,
``blocks.<i>.attn.qkv`` ...) so a local DeiT-S state dict loads with
``load_deit_weights``.

Shapes: ``C`` foreground classes, ``D`` width, a ``h x w`` patch grid with
``P = h * w`` patches, ``N = C + P`` tokens.

Two differences from a plain DeiT, following MCTformer-V2:
- ``cls_token`` is ``(1, C, D)`` and ``pos_embed`` ``(1, C + P, D)``;
- there is no final LayerNorm on the classification path: the class-token
  logit is the mean over channels of the last block's class token (a mean over
  a LayerNorm output would be a constant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import Tensor, nn

from weakclip_core.config.cam import MCTformerArchConfig
from weakclip_core.errors import InputError
from weakclip_core.artifacts.state_dict import unwrap_state_dict
from weakclip_core.artifacts.model_file import load_torch_file


class PretrainedWeightsError(InputError):
    """A weights file is missing, unreadable or does not fit the model; the message names the file."""


@dataclass
class MCTformerOutput:
    """What one forward pass gives.

    ``class_logits`` (B, C): mean over channels of each final class token.
    ``patch_logits`` (B, C): global average pool of ``patch_cams``.
    ``patch_cams`` (B, C, h, w): the PatchCAM branch, before any ReLU.
    ``attentions``: when asked, one (B, N, N) softmax map per layer (first layer first), averaged over the
    heads as the CAMs use it. Averaged as each layer ends: every head's map of every layer held to the end took
    ``heads`` times the memory (~15 GB of a GPU for a COCO batch of 16 at 640x480 with flip, 6 heads, 12 layers).
    """

    class_logits: Tensor
    patch_logits: Tensor
    patch_cams: Tensor
    attentions: list[Tensor] | None = None


class Attention(nn.Module):
    """Multi-head self-attention that can return its softmax weights (B, heads, N, N).

    Why not timm's ``Attention``: the CAMs need the class-to-patch attention weights, which timm's (fused)
    attention never materialises. Same parameters and keys (``qkv``, ``proj``) as DeiT, so DeiT weights
    load. Without ``return_weights`` it uses the fused kernel (same maths, faster for training).
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.head_width = width // heads
        self.scale = self.head_width ** -0.5
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, tokens: Tensor, return_weights: bool = True) -> tuple[Tensor, Tensor | None]:
        batch, n_tokens, width = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, n_tokens, 3, self.heads, self.head_width).permute(2, 0, 3, 1, 4)
        query, key, value = qkv[0], qkv[1], qkv[2]
        if return_weights:
            weights = ((query * self.scale) @ key.transpose(-2, -1)).softmax(dim=-1)
            mixed = weights @ value
        else:
            weights = None
            mixed = F.scaled_dot_product_attention(query, key, value)
        return self.proj(mixed.transpose(1, 2).reshape(batch, n_tokens, width)), weights


class Block(nn.Module):
    """Pre-norm transformer block (DeiT layout, LayerNorm eps 1e-6); returns tokens and attention weights."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))  # timm's DeiT MLP: fc1, GELU, fc2 (no dropout here)
        self.drop_path = DropPath(drop_path)

    def forward(self, tokens: Tensor, return_weights: bool = True) -> tuple[Tensor, Tensor | None]:
        attended, weights = self.attn(self.norm1(tokens), return_weights)
        tokens = tokens + self.drop_path(attended)
        tokens = tokens + self.drop_path(self.mlp(self.norm2(tokens)))
        return tokens, weights


class PatchEmbed(nn.Module):
    """Non-overlapping patches → tokens: (B, 3, H, W) → (B, P, D) and the grid (h, w) = (H // p, W // p)."""

    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        grid = self.proj(images)
        return grid.flatten(2).transpose(1, 2), (grid.shape[2], grid.shape[3])


class MCTformerV2(nn.Module):
    """ViT with ``n_classes`` class tokens and a ``Conv2d(D, C, 3, padding=1)`` PatchCAM head.

    ``n_classes`` counts foreground classes only (background has no token).
    The position embedding is learnt for ``image_size`` and bicubically resized
    for other inputs (multi-scale inference).
    """

    def __init__(self, n_classes: int, image_size: int = 224, patch_size: int = 16, width: int = 384,
                 depth: int = 12, heads: int = 6, mlp_ratio: float = 4.0, drop_path: float = 0.1) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.n_classes = n_classes
        self.patch_size = patch_size
        self.train_grid = image_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, n_classes, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_classes + self.train_grid ** 2, width))
        drop_rates = torch.linspace(0.0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, rate) for rate in drop_rates)
        self.patch_head = nn.Conv2d(width, n_classes, kernel_size=3, padding=1)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names AdamW should not decay (tokens and position embedding, as DeiT)."""
        return {"cls_token", "pos_embed"}

    def position_embedding(self, grid_height: int, grid_width: int) -> Tensor:
        """(1, C + h*w, D): class-token part as learnt, patch part resized bicubically to (h, w)."""
        class_part = self.pos_embed[:, :self.n_classes]
        patch_part = self.pos_embed[:, self.n_classes:]
        if (grid_height, grid_width) == (self.train_grid, self.train_grid):
            return self.pos_embed
        width = patch_part.shape[-1]
        grid = patch_part.reshape(1, self.train_grid, self.train_grid, width).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_height, grid_width), mode="bicubic", align_corners=False)
        return torch.cat([class_part, grid.permute(0, 2, 3, 1).reshape(1, grid_height * grid_width, width)], dim=1)

    def forward(self, images: Tensor, return_attention: bool = False) -> MCTformerOutput:
        """``images`` (B, 3, H, W), normalised; H and W are floored to multiples of the patch size."""
        patch_tokens, (grid_height, grid_width) = self.patch_embed(images)
        batch = images.shape[0]
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), patch_tokens], dim=1)
        tokens = tokens + self.position_embedding(grid_height, grid_width)
        attentions = []
        for block in self.blocks:
            tokens, weights = block(tokens, return_attention)
            if weights is not None:
                attentions.append(weights.mean(dim=1))  # (B, heads, N, N) -> (B, N, N)
        class_tokens = tokens[:, :self.n_classes]
        patch_grid = tokens[:, self.n_classes:].transpose(1, 2).reshape(batch, -1, grid_height, grid_width)
        patch_cams = self.patch_head(patch_grid)
        return MCTformerOutput(class_logits=class_tokens.mean(dim=-1), patch_logits=patch_cams.mean(dim=(2, 3)),
                               patch_cams=patch_cams, attentions=attentions if return_attention else None)


def build_mctformer(arch: MCTformerArchConfig, n_classes: int) -> MCTformerV2:
    """The model of ``cam.arch`` for ``n_classes`` foreground classes, randomly initialised: ``cam_train`` then
    loads ``arch.pretrained`` (``load_deit_weights``) when one is given, so its errors name that key."""
    return MCTformerV2(n_classes=n_classes, image_size=arch.image_size, patch_size=arch.patch_size,
                       width=arch.width, depth=arch.depth, heads=arch.heads, mlp_ratio=arch.mlp_ratio,
                       drop_path=arch.drop_path)


# Keys of a DeiT/ViT classification checkpoint that MCTformer has no use for.
_IGNORED_DEIT_PREFIXES = ("head.", "head_dist.", "norm.", "fc_norm.", "dist_token", "pre_logits.")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise PretrainedWeightsError(f"{path}: pretrained weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise PretrainedWeightsError(f"{path}: unreadable weights file ({error})") from None
    state = unwrap_state_dict(state)
    if state is None or not all(isinstance(v, Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{path}: expected a state dict of tensors (optionally under 'model')")
    return state


def load_deit_weights(model: MCTformerV2, path: str | Path) -> list[str]:
    """Load a timm/DeiT ViT state dict into ``model``; returns the checkpoint keys that were ignored.

    The single class token is replicated to the C class tokens (its position
    embedding too); the patch position embedding is resized to the model's
    grid. The PatchCAM head stays as initialised. Any missing backbone key or
    shape mismatch raises ``PretrainedWeightsError`` naming the file and key.
    """
    path = Path(path)
    source = _read_state_dict(path)
    target = model.state_dict()
    width = model.cls_token.shape[-1]
    n_prefix_tokens = 2 if "dist_token" in source else 1
    converted: dict[str, Tensor] = {}
    ignored = [key for key in source if key.startswith(_IGNORED_DEIT_PREFIXES)]
    for key, value in source.items():
        if key in ignored:
            continue
        if key == "cls_token":
            if value.ndim != 3 or value.shape[-1] != width:
                raise PretrainedWeightsError(f"{path}: cls_token has shape {tuple(value.shape)}, "
                                             f"the model needs width {width}")
            value = value[:, :1].expand(1, model.n_classes, width).clone()
        elif key == "pos_embed":
            value = _convert_pos_embed(path, value, n_prefix_tokens, model)
        elif key not in target:
            raise PretrainedWeightsError(f"{path}: unexpected key {key!r} (not a DeiT/ViT backbone weight "
                                         f"this model has)")
        if value.shape != target[key].shape:
            raise PretrainedWeightsError(f"{path}: {key} has shape {tuple(value.shape)}, the model "
                                         f"(cam.arch) needs {tuple(target[key].shape)}")
        converted[key] = value
    missing = [key for key in target if key not in converted and not key.startswith("patch_head.")]
    if missing:
        raise PretrainedWeightsError(f"{path}: missing {len(missing)} backbone weight(s), e.g. {missing[0]!r} "
                                     f"(are the model's depth and width the checkpoint's?)")
    model.load_state_dict(converted, strict=False)
    return ignored


def _convert_pos_embed(path: Path, pos_embed: Tensor, n_prefix_tokens: int, model: MCTformerV2) -> Tensor:
    """DeiT (1, prefix + g*g, D) → ours (1, C + G*G, D): class slot replicated, patch grid resized."""
    patch_part = pos_embed[:, n_prefix_tokens:]
    grid = math.isqrt(patch_part.shape[1])
    if pos_embed.ndim != 3 or grid * grid != patch_part.shape[1]:
        raise PretrainedWeightsError(f"{path}: pos_embed has shape {tuple(pos_embed.shape)}, "
                                     f"expected (1, {n_prefix_tokens} + g*g, D)")
    width = pos_embed.shape[-1]
    class_part = pos_embed[:, :1].expand(1, model.n_classes, width)
    if grid != model.train_grid:
        image_grid = patch_part.reshape(1, grid, grid, width).permute(0, 3, 1, 2)
        image_grid = F.interpolate(image_grid, size=(model.train_grid, model.train_grid), mode="bicubic",
                                   align_corners=False)
        patch_part = image_grid.permute(0, 2, 3, 1).reshape(1, model.train_grid ** 2, width)
    return torch.cat([class_part, patch_part], dim=1).clone()


def load_trained_mctformer(path: str | Path, device: torch.device | str = "cpu") -> tuple[MCTformerV2, dict[str, Any]]:
    """Rebuild the ``cam_train`` output (``save_final_model`` dict) in eval mode; returns (model, saved dict)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"{path}: trained MCTformer not found (run the cam_train stage)")
    saved = load_torch_file(path, "trained MCTformer")  # weights_only: a planted payload never runs
    try:
        arch = MCTformerArchConfig(**{**saved["config"]["arch"], "pretrained": ""})
        n_classes = int(saved["config"]["n_classes"])
    except (KeyError, TypeError) as error:
        raise PretrainedWeightsError(f"{path}: not a cam_train model file (missing {error})") from None
    model = build_mctformer(arch, n_classes)
    model.load_state_dict(saved["model"])
    return model.to(device).eval(), saved

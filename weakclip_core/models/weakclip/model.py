"""WeakCLIP: frozen CLIP + learnable prompts, pyramid adapter, co-attention matching, text-guided decoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.model import CLIP
from torch import nn

from weakclip_core.config.weakclip import WeakClipArchConfig
from weakclip_core.models.clip import (dense_visual_features, joint_width, text_width, visual_patch_size,
                                       visual_width)
from weakclip_core.models.weakclip.co_attention import CoAttention
from weakclip_core.models.weakclip.decoder import TextGuidedDecoder, initialise_as_the_reference
from weakclip_core.models.weakclip.matching import cosine_matching
from weakclip_core.models.weakclip.prompt_learner import PromptLearner
from weakclip_core.models.weakclip.pyramid_adapter import PyramidAdapter

OUTPUT_STRIDE = 4


@dataclass
class WeakClipOutput:
    """logits: P before softmax, (B, K, H/4, W/4); matching: λ' cosine map, (B, K, H/16, W/16)."""

    logits: torch.Tensor
    matching: torch.Tensor


class WeakCLIP(nn.Module):
    """The WeakCLIP segmenter over a frozen open_clip ``CLIP``.

    ``class_names`` has ``background`` at index 0 (K names in all). Both CLIP
    encoders are frozen (``requires_grad`` off) and stay in eval mode under
    ``.train()``; only the prompts, adapter, co-attention (with α, β) and
    decoder train. ``arch`` is the architecture alone (``WeakClipConfig.arch()``;
    the paper's is ``paper_weakclip_arch()``).

    Training-only settings (``weakclip.train``): ``prompt_init_std``, the truncated-normal std of the
    context vectors at construction; ``clip_drop_path_rate``, stochastic depth on the frozen visual
    encoder's residual branches while this module is in training mode (block i of L drops with
    rate·i/(L-1), as the reference's backbone, which mmseg keeps in train mode with drop_path_rate 0.1).
    Neither changes a weight or an eval-mode output. ``decoder_init``: ``reference`` re-draws the decoder's
    convolutions as the reference's mmcv ``ConvModule``s initialise themselves
    (:func:`~weakclip_core.models.weakclip.decoder.initialise_as_the_reference`); ``torch_default`` keeps
    PyTorch's.
    """

    def __init__(self, clip_model: CLIP, class_names: list[str], arch: WeakClipArchConfig,
                 prompt_init_std: float = 0.02, clip_drop_path_rate: float = 0.0,
                 clip_drop_path_unit: str = "image", decoder_init: str = "torch_default") -> None:
        super().__init__()
        if not isinstance(arch, WeakClipArchConfig):  # a whole WeakClipConfig has the same attribute names
            raise TypeError(f"WeakCLIP takes the architecture alone (WeakClipConfig.arch()), got {type(arch).__name__}")
        if not class_names or class_names[0] != "background":
            raise ValueError(f"class_names must start with 'background', got {class_names[:3]}")
        self.class_names = list(class_names)
        self.arch = arch
        self.taps = list(arch.taps)
        self.use_co_attention = arch.co_attention
        self.clip = clip_model
        for parameter in self.clip.parameters():
            parameter.requires_grad_(False)
        self.clip.eval()
        num_classes = len(class_names)
        joint = joint_width(clip_model)
        vision = visual_width(clip_model.visual)
        self.prompt_learner = PromptLearner(class_names, arch.prompt_len, arch.text_context_length,
                                            text_width(clip_model), prompt_init_std)
        self.clip_drop_path_rate = clip_drop_path_rate
        if clip_drop_path_rate > 0:
            self._add_clip_drop_path(clip_drop_path_rate, clip_drop_path_unit)
        self.pyramid_adapter = PyramidAdapter(vision)
        self.co_attention = (CoAttention(joint, arch.co_attention_width, arch.co_attention_heads,
                                         arch.co_attention_layers, arch.temperature_init, arch.dropout)
                             if arch.co_attention else None)
        self.decoder = TextGuidedDecoder(vision, num_classes, arch.neck_width, arch.head_width, arch.dropout)
        if decoder_init == "reference":
            initialise_as_the_reference(self.decoder)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _add_clip_drop_path(self, rate: float, unit: str) -> None:
        """Forward hooks on each visual block's two residual-branch outputs (open_clip's ``ls_1``, ``ls_2``)
        that drop the branch with the block's rate while ``self.training`` (the weights stay as they are; hooks,
        not modules, so the CLIP's state dict is unchanged). ``unit``: ``image`` draws one keep/drop per image
        (timm's per-sample rule); ``token`` one per token position, shared by the batch's images: what the
        reference's blocks do, since they see (L, N, D) tokens and timm's ``drop_path`` draws over dim 0."""
        blocks = list(self.clip.visual.transformer.resblocks)
        batch_dim = 0 if getattr(self.clip.visual.transformer, "batch_first", True) else 1
        drawn_dim = batch_dim if unit == "image" else 1 - batch_dim  # (N, L, D) or (L, N, D)
        rates = torch.linspace(0, rate, len(blocks)).tolist()

        def make_hook(block_rate: float):
            def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
                if not self.training or block_rate <= 0:
                    return output
                keep = 1.0 - block_rate
                shape = [1] * output.ndim
                shape[drawn_dim] = output.shape[drawn_dim]
                return output * output.new_empty(shape).bernoulli_(keep) / keep
            return hook

        for block, block_rate in zip(blocks, rates):
            for branch in (block.ls_1, block.ls_2):
                branch.register_forward_hook(make_hook(block_rate))

    def train(self, mode: bool = True) -> "WeakCLIP":
        super().train(mode)
        self.clip.eval()  # frozen encoders: no dropout, fixed behaviour in training too
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Prompts, adapter, co-attention (incl. α, β) and decoder; never a CLIP weight."""
        return [parameter for name, parameter in self.named_parameters()
                if not name.startswith("clip.") and parameter.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen CLIP (parameters and BN buffers): what a checkpoint must hold."""
        return {name: tensor for name, tensor in self.state_dict().items() if not name.startswith("clip.")}

    def load_trainable_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`trainable_state_dict` output; a missing or unexpected key is an error."""
        expected = set(self.trainable_state_dict())
        given = set(state_dict)
        if expected != given:
            raise KeyError(f"WeakCLIP state dict mismatch: missing {sorted(expected - given)[:5]}, "
                           f"unexpected {sorted(given - expected)[:5]}")
        self.load_state_dict(state_dict, strict=False)

    def text_embeddings(self) -> torch.Tensor:
        """(K, D) class text embeddings t from the learned prompts."""
        return self.prompt_learner(self.clip)

    def min_input_side(self) -> int:
        """The smallest input side, in pixels, the model takes: two patches, since the pyramid's 1/32 level
        max-pools the patch grid by 2 (one patch pools to nothing). Dense inference pads a thinner window to it."""
        return 2 * visual_patch_size(self.clip.visual)

    def forward(self, images: torch.Tensor) -> WeakClipOutput:
        """images: (B, 3, H, W) CLIP-normalised. A side that is not a multiple of the patch size loses its last
        H mod patch rows / W mod patch columns, as the reference's strided patch convolution drops them (the
        caller resizes the logits back to the window, as the reference's ``encode_decode`` does)."""
        patch = visual_patch_size(self.clip.visual)
        height, width = images.shape[2:]
        if height % patch or width % patch:
            images = images[:, :, :height - height % patch, :width - width % patch]
        with torch.no_grad():
            visual = dense_visual_features(self.clip.visual, images, self.taps)
        batch, joint, grid_h, grid_w = visual.patch_embeddings.shape
        text = self.text_embeddings().unsqueeze(0).expand(batch, -1, -1)  # (B, K, D)
        patches = visual.patch_embeddings.flatten(2).transpose(1, 2)  # (B, hw, D)
        if self.co_attention is not None:
            tokens = torch.cat([visual.global_embedding.unsqueeze(1), patches], dim=1)
            updated = self.co_attention(text, tokens)
            text = updated.text
            patches = updated.visual[:, 1:]
        patch_map = patches.transpose(1, 2).reshape(batch, joint, grid_h, grid_w)
        matching = cosine_matching(text, patch_map)
        pyramid = self.pyramid_adapter(visual.taps)
        logits = self.decoder(pyramid, matching)
        return WeakClipOutput(logits=logits, matching=matching)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities at the input size, (B, K, H, W): P upsampled (bilinear), then softmax."""
        logits = self.forward(images).logits
        logits = F.interpolate(logits, size=images.shape[2:], mode="bilinear", align_corners=False)
        return logits.softmax(dim=1)

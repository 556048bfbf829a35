"""Released WeakCLIP checkpoints (hustvl/WeakCLIP, mmseg layout) loaded into our model (issue #18, item 3).

The reference segmentor (``weakclip/weakclip.py`` ``WeakCLIP(BaseSegmentor)``, built by mmseg 0.x from
``configs/_base_/models/weakclip_vitb.py`` + ``configs/voc_weakclip_vit-b_512x512_20k_mct.py``; mmcv's
``save_checkpoint`` writes ``{"meta": ..., "state_dict": ..., "optimizer": ...}``). Its module tree, read
from those definitions (``weakclip/models.py``; mmseg's ``FPN`` neck and ``FPNHead``; ``weakclip/heads.py``):

- top level: ``contexts`` (1, N, text width), ``gamma`` and ``beta`` (embed_dim,) (``if_decouple=True``);
  ``texts`` (the tokenised class names) is a plain attribute, not in the state dict: the class names are
  given by the caller, background first.
- ``backbone`` = ``CLIPVisionTransformer``: the CLIP visual tower (``conv1`` bias-free, ``class_embedding``,
  ``positional_embedding`` already resized to the training grid, (input_resolution / patch)^2 + 1 rows,
  ``ln_pre``, ``transformer.resblocks.<i>`` (``nn.MultiheadAttention`` + ``c_fc``/``c_proj`` MLP, QuickGELU),
  ``ln_post``, ``proj``), **and the pyramid adapter** ``fpn1``..``fpn4`` (GroupNorm(1) / ConvTranspose2d 2x2 /
  SyncBN / GELU / ConvTranspose2d; GroupNorm / ConvT; GroupNorm; GroupNorm / MaxPool).
- ``text_encoder`` = ``CLIPTextContextEncoder``: ``token_embedding``, ``positional_embedding`` truncated to the
  13-token context, ``transformer.resblocks.<i>``, ``ln_final``, ``text_projection`` (the causal mask is a plain
  attribute, not in the state dict).
- ``context_decoder`` = ``ContextDecoder(if_decouple=True)``: ``memory_proj`` (LN, Linear, LN), ``text_proj``
  (LN, Linear), ``decoder.<l>`` and ``anti_decoder.<l>`` (``TransformerDecoderLayer``: ``self_attn`` /
  ``cross_attn`` with bias-free ``q_proj``/``k_proj``/``v_proj`` and a biased ``proj``, ``norm1..3``,
  ``mlp.0``/``mlp.3``), ``out_proj`` and ``anti_out_proj`` (LN, Linear).
- ``neck`` = mmseg ``FPN`` (4 in, 4 out, no extra convs, no norm): ``lateral_convs.<i>.conv`` 1x1 and
  ``fpn_convs.<i>.conv`` 3x3, both biased.
- ``decode_head`` = ``FPNHeadDGCN`` (mmseg ``FPNHead``): ``scale_heads.<i>.<j>.conv`` (bias-free: a norm follows)
  and ``.bn`` (SyncBN), j = 0, 2, 4 (an ``Upsample`` between), ``max(1, i)`` blocks at level i;
  ``conv_seg`` 1x1. ``identity_head`` (``IdentityHead``) sets ``conv_seg = None``: no tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from weakclip_core.config.weakclip import WeakClipArchConfig
from weakclip_core.models.reference_checkpoints import ReferenceCheckpointError, read_reference_state
from weakclip_core.models.weakclip.model import WeakCLIP


REFERENCE_CLIP_BLOCK_KEYS = (("ln_1.weight", "w"), ("ln_1.bias", "w"), ("attn.in_proj_weight", "3w,w"),
                             ("attn.in_proj_bias", "3w"), ("attn.out_proj.weight", "w,w"), ("attn.out_proj.bias", "w"),
                             ("ln_2.weight", "w"), ("ln_2.bias", "w"), ("mlp.c_fc.weight", "4w,w"),
                             ("mlp.c_fc.bias", "4w"), ("mlp.c_proj.weight", "w,4w"), ("mlp.c_proj.bias", "w"))
BATCH_NORM_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# our names of the reference's TransformerDecoderLayer parts (weakclip/models.py) in CoAttentionLayer
REFERENCE_DECODER_LAYER_RENAMED = {
    "self_attn.q_proj.weight": "self_attention.query.weight", "self_attn.k_proj.weight": "self_attention.key.weight",
    "self_attn.v_proj.weight": "self_attention.value.weight", "self_attn.proj.weight": "self_attention.out.weight",
    "self_attn.proj.bias": "self_attention.out.bias",
    "cross_attn.q_proj.weight": "cross_attention.query.weight",
    "cross_attn.k_proj.weight": "cross_attention.key.weight",
    "cross_attn.v_proj.weight": "cross_attention.value.weight", "cross_attn.proj.weight": "cross_attention.out.weight",
    "cross_attn.proj.bias": "cross_attention.out.bias",
    "norm1.weight": "self_norm.weight", "norm1.bias": "self_norm.bias", "norm2.weight": "cross_norm.weight",
    "norm2.bias": "cross_norm.bias", "norm3.weight": "mlp_norm.weight", "norm3.bias": "mlp_norm.bias",
    "mlp.0.weight": "mlp.0.weight", "mlp.0.bias": "mlp.0.bias", "mlp.3.weight": "mlp.3.weight",
    "mlp.3.bias": "mlp.3.bias"}
REFERENCE_CONTEXT_DECODER_RENAMED = {"memory_proj": "visual_in", "text_proj": "text_in", "out_proj": "text_out",
                                     "anti_out_proj": "visual_out"}
REFERENCE_ADAPTER_RENAMED = {"fpn1": "to_quarter", "fpn2": "to_eighth", "fpn3": "to_sixteenth",
                             "fpn4": "to_thirty_second"}
REFERENCE_VISUAL_KEYS = ("conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias",
                         "ln_post.weight", "ln_post.bias", "proj")
REFERENCE_TEXT_KEYS = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                       "text_projection")
CLIP_LOGIT_SCALE_INIT = math.log(1 / 0.07)  # open_clip's init; WeakCLIP never reads it


@dataclass(frozen=True)
class ReferenceClipDims:
    """The frozen CLIP's sizes as the reference stores them (ViT-B/16 at 512: 768, 12, 16, 32, 512, 512, 12).
    ``grid`` is the backbone's training patch grid (``input_resolution // patch_size``: its positional
    embedding has grid^2 + 1 rows); the text context length is the arch's ``text_context_length``."""

    vision_width: int
    vision_layers: int
    patch_size: int
    grid: int
    embed_dim: int
    text_width: int
    text_layers: int
    vocab_size: int = 49408


def _block_layout(prefix: str, width: int) -> dict[str, tuple[int, ...]]:
    sizes = {"w": width, "3w": 3 * width, "4w": 4 * width}
    return {f"{prefix}{key}": tuple(sizes[part] for part in shape.split(","))
            for key, shape in REFERENCE_CLIP_BLOCK_KEYS}


def _norm_layout(prefix: str, width: int, batch_norm: bool = False) -> dict[str, tuple[int, ...]]:
    keys = BATCH_NORM_KEYS if batch_norm else ("weight", "bias")
    return {f"{prefix}.{key}": (() if key == "num_batches_tracked" else (width,)) for key in keys}


def _linear_layout(prefix: str, out_width: int, in_width: int, bias: bool = True) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (out_width, in_width), **({f"{prefix}.bias": (out_width,)} if bias else {})}


def _conv_layout(prefix: str, out_width: int, in_width: int, kernel: int, bias: bool = True,
                 transposed: bool = False) -> dict[str, tuple[int, ...]]:
    weight = (in_width, out_width) if transposed else (out_width, in_width)
    return {f"{prefix}.weight": (*weight, kernel, kernel), **({f"{prefix}.bias": (out_width,)} if bias else {})}


def reference_weakclip_layout(arch: WeakClipArchConfig, num_classes: int,
                              clip: ReferenceClipDims) -> dict[str, tuple[int, ...]]:
    """Every key of the reference WeakCLIP's state dict and its shape, from the reference's module definitions
    (see the comment above; not from our modules). ``arch`` gives N (``prompt_len``), the text context length,
    the ContextDecoder's width and layer count and the FPN neck / head widths; ``num_classes`` is K with
    background. At the paper's arch, K = 21 and ViT-B/16 at 512 this is the released VOC checkpoint's layout."""
    vw, tw, joint = clip.vision_width, clip.text_width, clip.embed_dim
    layout: dict[str, tuple[int, ...]] = {"contexts": (1, arch.prompt_len, tw), "gamma": (joint,), "beta": (joint,)}
    # backbone: the CLIP visual tower, then the adapter fpn1..fpn4
    layout.update({"backbone.conv1.weight": (vw, 3, clip.patch_size, clip.patch_size),
                   "backbone.class_embedding": (vw,), "backbone.positional_embedding": (clip.grid ** 2 + 1, vw)})
    layout.update(_norm_layout("backbone.ln_pre", vw))
    for index in range(clip.vision_layers):
        layout.update(_block_layout(f"backbone.transformer.resblocks.{index}.", vw))
    layout.update(_norm_layout("backbone.ln_post", vw))
    layout["backbone.proj"] = (vw, joint)
    layout.update(_norm_layout("backbone.fpn1.0", vw))
    layout.update(_conv_layout("backbone.fpn1.1", vw, vw, 2, transposed=True))
    layout.update(_norm_layout("backbone.fpn1.2", vw, batch_norm=True))
    layout.update(_conv_layout("backbone.fpn1.4", vw, vw, 2, transposed=True))
    layout.update(_norm_layout("backbone.fpn2.0", vw))
    layout.update(_conv_layout("backbone.fpn2.1", vw, vw, 2, transposed=True))
    layout.update(_norm_layout("backbone.fpn3", vw))
    layout.update(_norm_layout("backbone.fpn4.0", vw))
    # text_encoder: the CLIP text tower at the truncated context
    layout.update({"text_encoder.token_embedding.weight": (clip.vocab_size, tw),
                   "text_encoder.positional_embedding": (arch.text_context_length, tw)})
    for index in range(clip.text_layers):
        layout.update(_block_layout(f"text_encoder.transformer.resblocks.{index}.", tw))
    layout.update(_norm_layout("text_encoder.ln_final", tw))
    layout["text_encoder.text_projection"] = (tw, joint)
    # context_decoder (ContextDecoder, if_decouple)
    width = arch.co_attention_width
    layout.update(_norm_layout("context_decoder.memory_proj.0", joint))
    layout.update(_linear_layout("context_decoder.memory_proj.1", width, joint))
    layout.update(_norm_layout("context_decoder.memory_proj.2", width))
    layout.update(_norm_layout("context_decoder.text_proj.0", joint))
    layout.update(_linear_layout("context_decoder.text_proj.1", width, joint))
    for stack in ("decoder", "anti_decoder"):
        for index in range(arch.co_attention_layers):
            prefix = f"context_decoder.{stack}.{index}"
            for attention in ("self_attn", "cross_attn"):
                for projection in ("q_proj", "k_proj", "v_proj"):
                    layout.update(_linear_layout(f"{prefix}.{attention}.{projection}", width, width, bias=False))
                layout.update(_linear_layout(f"{prefix}.{attention}.proj", width, width))
            for norm in ("norm1", "norm2", "norm3"):
                layout.update(_norm_layout(f"{prefix}.{norm}", width))
            layout.update(_linear_layout(f"{prefix}.mlp.0", 4 * width, width))
            layout.update(_linear_layout(f"{prefix}.mlp.3", width, 4 * width))
    for projection in ("out_proj", "anti_out_proj"):
        layout.update(_norm_layout(f"context_decoder.{projection}.0", width))
        layout.update(_linear_layout(f"context_decoder.{projection}.1", joint, width))
    # neck (mmseg FPN): inputs are the 4 adapter levels with the K score maps concatenated
    for index in range(4):
        layout.update(_conv_layout(f"neck.lateral_convs.{index}.conv", arch.neck_width, vw + num_classes, 1))
    for index in range(4):
        layout.update(_conv_layout(f"neck.fpn_convs.{index}.conv", arch.neck_width, arch.neck_width, 3))
    # decode_head (FPNHead): level i has max(1, i) ConvModules at Sequential indices 0, 2, 4 (Upsample between)
    for level in range(4):
        for block in range(max(1, level)):
            in_width = arch.neck_width if block == 0 else arch.head_width
            prefix = f"decode_head.scale_heads.{level}.{2 * block if level else 0}"
            layout.update(_conv_layout(f"{prefix}.conv", arch.head_width, in_width, 3, bias=False))
            layout.update(_norm_layout(f"{prefix}.bn", arch.head_width, batch_norm=True))
    layout.update(_conv_layout("decode_head.conv_seg", num_classes, arch.head_width, 1))
    return layout


def reference_equivalent_arch(arch: WeakClipArchConfig) -> WeakClipArchConfig:
    """The arch of our model that computes what the reference computes with ``arch``: one co-attention layer per
    branch. The reference's ``ContextDecoder`` feeds every layer the same input and keeps only the last layer's
    output, so layers 0..L-2 never reach its output; our layers are chained (the paper), and one layer holding
    the reference's last is the exact equivalent."""
    return replace(arch, co_attention_layers=1)


def reference_clip_dims(state: dict[str, Any], path: Path) -> ReferenceClipDims:
    """The CLIP sizes read from a reference WeakCLIP state dict (its layout is checked in full afterwards)."""
    needed = ("backbone.conv1.weight", "backbone.positional_embedding", "backbone.proj",
              "text_encoder.token_embedding.weight")
    absent = [key for key in needed if not isinstance(state.get(key), torch.Tensor)]
    if absent:
        raise _weakclip_error(path, f"missing keys {absent[:4]}" + (
            f"; its keys start {sorted(state)[:3]}" if state else "; it is empty"))
    rows = state["backbone.positional_embedding"].shape[0] - 1
    grid = math.isqrt(max(rows, 0))
    if grid * grid != rows:
        raise _weakclip_error(path, f"backbone.positional_embedding has {rows} patch rows, not a square grid")

    def count(prefix: str) -> int:
        return len({key[len(prefix):].split(".")[0] for key in state if key.startswith(prefix)})

    return ReferenceClipDims(vision_width=state["backbone.conv1.weight"].shape[0],
                             vision_layers=count("backbone.transformer.resblocks."),
                             patch_size=state["backbone.conv1.weight"].shape[-1], grid=grid,
                             embed_dim=state["backbone.proj"].shape[-1],
                             text_width=state["text_encoder.token_embedding.weight"].shape[1],
                             text_layers=count("text_encoder.transformer.resblocks."),
                             vocab_size=state["text_encoder.token_embedding.weight"].shape[0])


def _weakclip_error(path: Path | str, message: str) -> ReferenceCheckpointError:
    return ReferenceCheckpointError(f"{path}: not a WeakCLIP checkpoint of this layout ({message})")


def check_reference_weakclip_layout(state: dict[str, Any], path: Path | str, arch: WeakClipArchConfig,
                                    num_classes: int, clip: ReferenceClipDims) -> None:
    """Refuse (one line naming ``path``) any missing key, unexpected key or wrong shape against the layout."""
    layout = reference_weakclip_layout(arch, num_classes, clip)
    missing, unexpected = sorted(set(layout) - set(state)), sorted(set(state) - set(layout))
    if missing or unexpected:
        raise _weakclip_error(path, f"missing keys {missing[:4]}, unexpected keys {unexpected[:4]}")
    wrong = [f"{key} is {tuple(state[key].shape)}, expected {shape}" for key, shape in layout.items()
             if not isinstance(state[key], torch.Tensor) or tuple(state[key].shape) != shape]
    if wrong:
        raise _weakclip_error(path, f"{len(wrong)} wrong shapes: {'; '.join(wrong[:2])} (K = {num_classes}, "
                                    f"prompt_len {arch.prompt_len}, co-attention width {arch.co_attention_width})")


def _our_co_attention_key(key: str, last_layer: int) -> str | None:
    """Our ``co_attention.*`` name of a ``context_decoder.*`` key; ``None`` for a layer the reference never uses."""
    head, rest = key.split(".", 1)
    if head in REFERENCE_CONTEXT_DECODER_RENAMED:
        return f"co_attention.{REFERENCE_CONTEXT_DECODER_RENAMED[head]}.{rest}"
    index, part = rest.split(".", 1)
    if int(index) != last_layer:
        return None
    stack = "text_layers" if head == "decoder" else "visual_layers"
    return f"co_attention.{stack}.0.{REFERENCE_DECODER_LAYER_RENAMED[part]}"


def _our_key(key: str, last_layer: int) -> str | None:
    """Our WeakCLIP state-dict name of a reference key (the module tree in the comment above, renamed)."""
    module, rest = key.split(".", 1) if "." in key else (key, "")
    if module == "backbone":
        stage, _, tail = rest.partition(".")
        if stage in REFERENCE_ADAPTER_RENAMED:
            return f"pyramid_adapter.{REFERENCE_ADAPTER_RENAMED[stage]}.{tail}"
        return f"clip.visual.{rest}"
    if module == "text_encoder":
        return f"clip.{rest}"
    if module == "context_decoder":
        return _our_co_attention_key(rest, last_layer)
    if module == "neck":
        kind, index, _, tail = rest.split(".")  # lateral_convs.<i>.conv.<weight|bias>
        return f"decoder.neck.{'laterals' if kind == 'lateral_convs' else 'outputs'}.{index}.{tail}"
    if module == "decode_head":
        if rest.startswith("conv_seg."):
            return f"decoder.head.classifier.{rest.split('.', 1)[1]}"
        _, level, block, layer, tail = rest.split(".", 4)  # scale_heads.<i>.<j>.<conv|bn>.<name>
        return f"decoder.head.scale_heads.{level}.{block}.{0 if layer == 'conv' else 1}.{tail}"
    return {"contexts": "prompt_learner.contexts", "gamma": "co_attention.text_temperature",
            "beta": "co_attention.visual_temperature"}[key]


def weakclip_state_from_reference(state: dict[str, Any], path: Path | str, arch: WeakClipArchConfig,
                                  num_classes: int) -> tuple[dict[str, torch.Tensor], ReferenceClipDims]:
    """Our WeakCLIP's full state dict (``clip.*`` included) from a reference one, and the CLIP's sizes.

    The checkpoint must have exactly the layout of :func:`reference_weakclip_layout` at ``arch`` (the
    reference's, e.g. 3 co-attention layers) and ``num_classes``; otherwise a :class:`ReferenceCheckpointError`
    of one line names ``path``. The result loads strictly into ``WeakCLIP(clip, names, reference_equivalent_arch(
    arch))`` over an open_clip ``CLIP`` of :func:`reference_open_clip_config` and computes the reference's eval
    forward (tested at a small size). What does not map one to one:

    - ``context_decoder.{decoder,anti_decoder}.<l>`` for l < L-1 are dropped: the reference's ``ContextDecoder``
      keeps only its last layer's output (``for layer in self.decoder: text_diff = layer(text, visual)``), so
      they never reach the output; its last layer becomes our single (``reference_equivalent_arch``) layer.
    - ``backbone.positional_embedding[0]``: the reference's ``CLIPVisionTransformer.forward`` adds
      ``class_embedding`` to the class token twice (once in the token, once in ``cls_pos``), open_clip and
      ours once; our class position is stored as the reference's plus ``class_embedding``, which gives the
      same token (the other rows are copied, resized at run time by the same bilinear interpolation).
    - ``contexts`` (1, N, D) becomes our (N, D); ``clip.logit_scale``, which the reference does not have and
      WeakCLIP never reads, is set to open_clip's initial log(1/0.07).
    """
    clip = reference_clip_dims(state, Path(path))
    if not arch.co_attention:
        raise ValueError("the reference WeakCLIP always has its ContextDecoder: arch.co_attention must be true")
    check_reference_weakclip_layout(state, path, arch, num_classes, clip)
    last_layer = arch.co_attention_layers - 1
    ours: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = _our_key(key, last_layer)
        if name is not None:
            ours[name] = value
    ours["prompt_learner.contexts"] = state["contexts"][0]
    positional = state["backbone.positional_embedding"].clone()
    positional[0] = positional[0] + state["backbone.class_embedding"]
    ours["clip.visual.positional_embedding"] = positional
    ours["clip.logit_scale"] = torch.tensor(CLIP_LOGIT_SCALE_INIT, dtype=positional.dtype)
    return ours, clip


def reference_open_clip_config(clip: ReferenceClipDims, text_context_length: int, vision_head_width: int = 64,
                               text_heads: int = 8) -> dict[str, Any]:
    """The open_clip ``CLIP`` config holding the reference's frozen CLIP: OpenAI's (QuickGELU), the visual
    tower at the training grid, the text tower at the truncated context. The head counts are not in the
    state dict's shapes (ViT-B/16: head width 64, i.e. 12 visual heads; 8 text heads)."""
    return {"embed_dim": clip.embed_dim, "quick_gelu": True,
            "vision_cfg": {"image_size": clip.grid * clip.patch_size, "patch_size": clip.patch_size,
                           "width": clip.vision_width, "layers": clip.vision_layers, "head_width": vision_head_width,
                           "mlp_ratio": 4.0},
            "text_cfg": {"context_length": text_context_length, "vocab_size": clip.vocab_size,
                         "width": clip.text_width, "heads": text_heads, "layers": clip.text_layers}}


def load_reference_weakclip(path: str | Path, class_names: list[str], arch: WeakClipArchConfig | None = None,
                            vision_head_width: int = 64, text_heads: int = 8) -> WeakCLIP:
    """Our ``WeakCLIP`` (eval mode, CPU) holding a released hustvl/WeakCLIP (mmseg) checkpoint, loaded strictly.

    The checkpoint holds the frozen CLIP too (``backbone.*``, ``text_encoder.*``), so no CLIP file is needed.
    ``class_names``: the K names the model was trained with, background first (VOC: ``background``,
    ``aeroplane``, ...; the reference tokenises them, the state dict does not hold them). ``arch``: the
    reference's architecture (default: the paper's, ``paper_weakclip_arch()``, which is the VOC config's);
    the model built has ``reference_equivalent_arch(arch)`` (see :func:`weakclip_state_from_reference`).
    """
    from weakclip_core.config.weakclip import paper_weakclip_arch  # noqa: PLC0415
    from weakclip_core.models.clip import clip_from_config  # noqa: PLC0415

    path = Path(path)
    arch = arch or paper_weakclip_arch()
    state = read_reference_state(path, "WeakCLIP checkpoint")
    ours, clip = weakclip_state_from_reference(state, path, arch, len(class_names))
    clip_model = clip_from_config(reference_open_clip_config(clip, arch.text_context_length, vision_head_width,
                                                             text_heads))
    model = WeakCLIP(clip_model, list(class_names), reference_equivalent_arch(arch))
    try:
        model.load_state_dict(ours, strict=True)
    except RuntimeError as error:
        raise _weakclip_error(path, str(error).splitlines()[0][:300]) from None
    return model.eval()

"""The frozen CLIP that WeakCLIP adapts: build it, load it from a local file, run it densely, save it.

Three ways to obtain the model (``clip.source``):

- ``pretrain`` / ``random``: an open_clip ``CLIP`` built from ``clip.arch`` (the
  small synthetic CLIP; ``pipeline/clip.py`` pretrains it for ``pretrain``).
- ``file``: a local open_clip or OpenAI checkpoint (``.pt``/``.bin``/``.safetensors``)
  loaded into the open_clip architecture ``clip.model_name``. Hub tags
  (``openai``, ``laion2b_s34b_b88k``) are refused at once: nothing is
  downloaded at run time. OpenAI weights use QuickGELU: name the architecture
  ``ViT-B-16-quickgelu`` for them.

The model is always built as ``open_clip.model.CLIP(**model_config)`` from a
plain config dict (``embed_dim``, full ``vision_cfg``, full ``text_cfg``), so the
``clip`` stage's artifact (weights + that dict as JSON) rebuilds exactly the
same model in ``weakclip_train`` without touching open_clip's name registry.
"""

from __future__ import annotations

from weakclip_core.errors import InputError
import copy
import json
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, resize_pos_embed
from torch import nn

from weakclip_core.artifacts.atomic import atomic_path, sha256_of_file, write_json
from weakclip_core.config.clip import ClipArchConfig, ClipConfig
from weakclip_core.artifacts.state_dict import unwrap_state_dict
from weakclip_core.artifacts.model_file import load_torch_file, unpickling_reason

WEIGHTS_FILE = "weights.pt"
MODEL_CONFIG_FILE = "model_config.json"
INFO_FILE = "clip.json"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


class ClipWeightsError(InputError):
    """A CLIP weights file that is missing, a hub tag, not a checkpoint, or not of this architecture."""


# --------------------------------------------------------------------------- configs

def arch_model_config(arch: ClipArchConfig) -> dict[str, Any]:
    """The complete open_clip model config of ``clip.arch``.

    Every field of ``vision_cfg`` and ``text_cfg`` that sets a size is given:
    open_clip fills missing fields with ViT-B defaults (width 768, 12 layers)
    without a word.
    """
    return {
        "embed_dim": arch.embed_dim,
        "vision_cfg": {
            "image_size": arch.image_size,
            "patch_size": arch.patch_size,
            "width": arch.vision_width,
            "layers": arch.vision_layers,
            "head_width": arch.vision_head_width,
            "mlp_ratio": 4.0,
        },
        "text_cfg": {
            "context_length": arch.context_length,
            "vocab_size": 49408,
            "width": arch.text_width,
            "heads": arch.text_heads,
            "layers": arch.text_layers,
        },
    }


def named_model_config(model_name: str, image_size: int | None = None) -> dict[str, Any]:
    """open_clip's config of a named architecture (``ViT-B-16``), optionally at another image size."""
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ClipWeightsError(f"clip.model_name: '{model_name}' is not an open_clip architecture "
                               f"(e.g. ViT-B-16, ViT-B-16-quickgelu)")
    config = copy.deepcopy(config)
    if image_size is not None:
        config["vision_cfg"]["image_size"] = image_size
    return config


def clip_from_config(model_config: dict[str, Any]) -> CLIP:
    """An open_clip ``CLIP`` (random init) from a complete config dict."""
    return CLIP(**copy.deepcopy(model_config))


# --------------------------------------------------------------------------- building and loading

def build_clip(cfg: ClipConfig, image_size: int | None = None) -> CLIP:
    """The CLIP of ``clip.source``.

    ``pretrain``/``random`` → random-init CLIP of ``cfg.arch`` (training is the
    ``clip`` stage's job); ``file`` → :func:`load_clip_file` of
    ``cfg.model_name``/``cfg.weights``. ``image_size`` resizes the stored
    positional embedding (file source only; the dense forward interpolates it
    at run time anyway).
    """
    if cfg.source in ("pretrain", "random"):
        return clip_from_config(arch_model_config(cfg.arch))
    if cfg.source == "file":
        return load_clip_file(cfg.model_name, cfg.weights, image_size=image_size)
    raise ClipWeightsError(f"clip.source: unknown source '{cfg.source}' (file | pretrain | random)")


def clip_model_config(cfg: ClipConfig, model: CLIP) -> dict[str, Any]:
    """The complete config dict that rebuilds ``model`` (built by :func:`build_clip` from ``cfg``)."""
    if cfg.source == "file":
        visual = model.visual
        side = int(round((visual.positional_embedding.shape[0] - 1) ** 0.5))
        return named_model_config(cfg.model_name, image_size=side * visual_patch_size(visual))
    return arch_model_config(cfg.arch)


def check_weights_path(weights: str | Path) -> Path:
    """The weights path as an existing file, or an error telling the user what to do (no download)."""
    text = str(weights).strip()
    path = Path(text).expanduser()
    if not text or not path.is_file():
        hint = ("it looks like a hub tag; " if text and "/" not in text and path.suffix not in CHECKPOINT_SUFFIXES
                else "")
        raise ClipWeightsError(
            f"clip.weights: '{text}' is not an existing file ({hint}nothing is downloaded at run time). "
            f"Download the CLIP checkpoint yourself (e.g. OpenAI ViT-B-16.pt or an open_clip "
            f".safetensors) and set clip.weights to its local path.")
    return path


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a CLIP checkpoint: safetensors, torch state dict (optionally under
    ``state_dict``, DDP ``module.`` prefixes removed: ``unwrap_state_dict``) or an OpenAI TorchScript archive."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            loaded: Any = load_file(str(path), device="cpu")
        elif _is_torchscript_archive(path):
            with warnings.catch_warnings():  # OpenAI ships its CLIPs only as TorchScript, and only the tensors are
                # read: torch's "torch.jit.load is deprecated" on every clip run is nothing a user can act on
                warnings.filterwarnings("ignore", message=r"`torch\.jit\.load` is deprecated", category=FutureWarning)
                loaded = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 — any reader failure means "not a checkpoint"
        # One line: torch's weights-only refusal is a page long (unpickling_reason keeps its reason).
        raise ClipWeightsError(f"clip.weights: '{path}' is not a readable CLIP checkpoint "
                               f"(.pt/.bin/.safetensors): {type(error).__name__}: {unpickling_reason(error)}") from error
    state_dict = unwrap_state_dict(loaded)
    if not state_dict or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ClipWeightsError(f"clip.weights: '{path}' does not hold a state dict of tensors")
    return state_dict


OPENAI_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")  # in OpenAI's state dicts, not open_clip's
OPEN_CLIP_CONFIG = "open_clip_config.json"  # beside the weights in open_clip's hub folders: its model_cfg


def quick_gelu_evidence(path: Path, state_dict: dict[str, torch.Tensor]) -> str | None:
    """Why the weights at ``path`` are known to need QuickGELU blocks, or ``None`` when nothing says so: an
    OpenAI TorchScript archive, the state dict of one saved as it is (``torch.jit.load(...).state_dict()`` keeps
    OpenAI's ``input_resolution`` / ``context_length`` / ``vocab_size`` entries), or an ``open_clip_config.json``
    beside the file whose ``model_cfg`` sets ``quick_gelu`` (open_clip's hub copies of OpenAI's weights). A state
    dict of OpenAI's ``clip.load(..., jit=False)`` model has none of these marks (its ``build_model`` drops
    them) and cannot be told from LAION's GELU weights: the ``clip`` stage's summary names the activation the
    architecture builds."""
    if _is_torchscript_archive(path):
        return "is an OpenAI TorchScript archive, whose blocks use QuickGELU"
    if any(key in state_dict for key in OPENAI_ONLY_KEYS):
        return "holds the state dict of OpenAI's TorchScript archive (its input_resolution / context_length / " \
               "vocab_size entries), whose blocks use QuickGELU"
    config_path = path.parent / OPEN_CLIP_CONFIG
    if config_path.is_file():
        try:
            model_cfg = json.loads(config_path.read_text(encoding="utf-8")).get("model_cfg", {})
        except (ValueError, OSError, AttributeError):
            return None
        if isinstance(model_cfg, dict) and model_cfg.get("quick_gelu") is True:
            return f"comes with {config_path}, whose model_cfg sets quick_gelu: true"
    return None


def load_clip_file(model_name: str, weights_path: str | Path, image_size: int | None = None) -> CLIP:
    """Load a local CLIP checkpoint into the open_clip architecture ``model_name``.

    Refuses anything that is not an existing file (hub tags) before touching
    open_clip, so it fails in milliseconds. A file whose tensors do not fit
    the architecture raises :class:`ClipWeightsError` naming the file.
    Returns the model in eval mode.
    """
    path = check_weights_path(weights_path)
    model_config = named_model_config(model_name, image_size=image_size)
    state_dict = read_state_dict(path)
    evidence = quick_gelu_evidence(path, state_dict)
    if evidence is not None and not model_config.get("quick_gelu", False):
        # OpenAI's weights: their blocks compute QuickGELU. Loaded into GELU blocks the tensors fit and nothing
        # fails, but every activation is another function: a quietly degraded CLIP under every stage.
        raise ClipWeightsError(f"clip.weights: '{path}' {evidence}, but clip.model_name '{model_name}' builds GELU "
                               f"blocks; set clip.model_name: {model_name}-quickgelu")
    for key in OPENAI_ONLY_KEYS:
        state_dict.pop(key, None)
    model = clip_from_config(model_config)
    if "logit_scale" in state_dict and state_dict["logit_scale"].ndim != model.logit_scale.ndim:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model.logit_scale.shape)
    try:
        resize_pos_embed(state_dict, model)
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, KeyError, ValueError) as error:
        raise ClipWeightsError(f"clip.weights: '{path}' does not match the open_clip architecture "
                               f"'{model_name}': {' '.join(str(error).split())[:600]}") from error  # one line
    return model.eval()


# --------------------------------------------------------------------------- the clip stage's artifact

def stored_tensor(value: torch.Tensor) -> torch.Tensor:
    """``value`` as fp16 if fp16 holds it exactly (converting back gives the same bits), else unchanged."""
    if value.dtype != torch.float32:
        return value
    half = value.to(torch.float16)
    return half if torch.equal(half.to(torch.float32), value) else value


def save_clip_artifact(directory: str | Path, model: CLIP, cfg: ClipConfig,
                       info: dict[str, Any] | None = None) -> None:
    """Write ``artifacts/clip/``: ``weights.pt`` (state dict), ``model_config.json``, ``clip.json``.

    ``clip.json`` records the source, the model name, the parameter count,
    for ``source: file`` the weights path and its ``sha256``, and whatever
    ``info`` adds (pretraining numbers).

    For ``source: file`` each tensor that fp16 holds exactly is stored as fp16 (``stored_tensor``): OpenAI's
    ViT-B/16 ships its matrices in fp16, and stored back as the fp32 model holds them the artifact doubled
    (286 MB file, 571 MB artifact), in every cache, remote and worker clone. Loading copies them into the fp32
    model, so the model is the same to the bit. A CLIP trained or drawn here is stored as it is.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state_dict = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    if cfg.source == "file":
        state_dict = {key: stored_tensor(value) for key, value in state_dict.items()}
    with atomic_path(directory / WEIGHTS_FILE) as temporary, open(temporary, "wb") as stream:
        # A stream, not the path: torch names the archive after the (random) temporary file name.
        torch.save(state_dict, stream)
    write_json(directory / MODEL_CONFIG_FILE, clip_model_config(cfg, model))
    details: dict[str, Any] = {"source": cfg.source, "model_name": cfg.model_name,
                               "parameters": sum(parameter.numel() for parameter in model.parameters())}
    if cfg.source == "file":
        weights = check_weights_path(cfg.weights)
        details.update(weights=str(weights.resolve()), sha256=sha256_of_file(weights))
    details.update(info or {})
    write_json(directory / INFO_FILE, details)


def load_clip_artifact(directory: str | Path) -> CLIP:
    """Rebuild the CLIP saved by :func:`save_clip_artifact` (eval mode, CPU)."""
    directory = Path(directory)
    config_path = directory / MODEL_CONFIG_FILE
    weights_path = directory / WEIGHTS_FILE
    for required in (config_path, weights_path):
        if not required.is_file():
            raise FileNotFoundError(f"{required}: missing; run the clip stage first")
    model_config = json.loads(config_path.read_text())
    model = clip_from_config(model_config)
    state_dict = load_torch_file(weights_path, "CLIP artifact's weights")  # one line if it holds more than tensors
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ClipWeightsError(f"{weights_path}: does not match {config_path}: {str(error)[:600]}") from error
    return model.eval()


def load_clip_artifact_config(directory: str | Path) -> dict[str, Any]:
    """The model config dict stored beside the weights."""
    return json.loads((Path(directory) / MODEL_CONFIG_FILE).read_text())


# --------------------------------------------------------------------------- dense visual forward

@dataclass
class DenseVisualFeatures:
    """What the frozen visual tower gives WeakCLIP for one batch.

    taps: one (B, vision_width, H/p, W/p) map per tapped block (patch tokens only).
    global_embedding: (B, embed_dim) class token through ln_post and proj.
    patch_embeddings: (B, embed_dim, H/p, W/p) last block's patch tokens through
        ln_post and proj (DenseCLIP's dense joint-space features).
    """

    taps: list[torch.Tensor]
    global_embedding: torch.Tensor
    patch_embeddings: torch.Tensor


def visual_width(visual: nn.Module) -> int:
    return int(visual.conv1.out_channels)


def visual_patch_size(visual: nn.Module) -> int:
    return int(visual.conv1.kernel_size[0])


def interpolated_positional_embedding(visual: nn.Module, grid_h: int, grid_w: int) -> torch.Tensor:
    """(1 + grid_h * grid_w, width) positional embedding resized (bilinear) to a patch grid."""
    positional = visual.positional_embedding
    class_position, patch_positions = positional[:1], positional[1:]
    side = int(round(patch_positions.shape[0] ** 0.5))
    if side * side != patch_positions.shape[0]:
        raise ValueError(f"positional embedding of {patch_positions.shape[0]} patches is not a square grid")
    if (side, side) == (grid_h, grid_w):
        return positional
    grid = patch_positions.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
    return torch.cat([class_position, grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)], dim=0)


def visual_input_tokens(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(B, 1 + grid_h * grid_w, width) tokens that enter the first block (class token first, after ``ln_pre``),
    and the patch grid (grid_h, grid_w); images (B, 3, H, W) of any size that is a multiple of the patch size."""
    patch = visual_patch_size(visual)
    batch, _, height, width = images.shape
    if height % patch or width % patch:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch}")
    grid_h, grid_w = height // patch, width // patch
    tokens = visual.conv1(images).flatten(2).transpose(1, 2)  # (B, hw, width)
    class_token = visual.class_embedding.to(tokens.dtype).view(1, 1, -1).expand(batch, -1, -1)
    tokens = torch.cat([class_token, tokens], dim=1)
    tokens = tokens + interpolated_positional_embedding(visual, grid_h, grid_w).to(tokens.dtype)
    return visual.ln_pre(tokens), grid_h, grid_w


def dense_visual_features(visual: nn.Module, images: torch.Tensor, taps: list[int]) -> DenseVisualFeatures:
    """Run open_clip's ``VisionTransformer`` at any input size (multiple of the patch size).

    images: (B, 3, H, W) normalised with CLIP's mean/std. The positional
    embedding is interpolated to the patch grid at forward time; blocks
    ``taps`` (0-based) give intermediate patch tokens; the last block's
    tokens go through ``ln_post`` and ``proj`` into the joint space.
    """
    blocks = visual.transformer.resblocks
    if any(tap < 0 or tap >= len(blocks) for tap in taps):
        raise ValueError(f"taps {taps} outside the visual tower's {len(blocks)} blocks")
    batch = images.shape[0]
    tokens, grid_h, grid_w = visual_input_tokens(visual, images)
    # Under bf16 autocast the patch convolution returns bf16 tokens; blocks fed those refuse nn.MultiheadAttention's
    # fused path (query and weight dtypes differ), and its fallback runs a bf16 linear on a transposed view that
    # is ~100x slower on CPU (44 s instead of 1.4 s for the ViT-B/16 at 512, batch 2: docs/BENCHMARKS.md). The
    # blocks take tokens in their weights' dtype; without autocast this is a no-op (fp32 stays bit-identical).
    tokens = tokens.to(visual.conv1.weight.dtype)
    batch_first = getattr(visual.transformer, "batch_first", True)
    if not batch_first:
        tokens = tokens.transpose(0, 1)
    tapped: list[torch.Tensor] = []
    for index, block in enumerate(blocks):
        tokens = block(tokens)
        if index in taps:
            nld = tokens if batch_first else tokens.transpose(0, 1)
            tapped.append(nld[:, 1:].transpose(1, 2).reshape(batch, -1, grid_h, grid_w))
    if not batch_first:
        tokens = tokens.transpose(0, 1)
    projected = visual.ln_post(tokens)
    if visual.proj is not None:
        projected = projected @ visual.proj
    patch_embeddings = projected[:, 1:].transpose(1, 2).reshape(batch, -1, grid_h, grid_w)
    ordered = [tapped[sorted(taps).index(tap)] for tap in taps]
    return DenseVisualFeatures(taps=ordered, global_embedding=projected[:, 0], patch_embeddings=patch_embeddings)


# --------------------------------------------------------------------------- text forward with learned context

def causal_mask(length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(length, length) additive causal mask (-inf above the diagonal), as CLIP's text encoder uses."""
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu_(1)


def encode_token_embeddings(clip_model: CLIP, token_embeddings: torch.Tensor,
                            end_positions: torch.Tensor) -> torch.Tensor:
    """CLIP's text encoder on given token embeddings (learned contexts already inserted).

    token_embeddings: (N, L, text_width) with L ≤ the CLIP's context length;
    the first L positional embeddings are used (DenseCLIP truncates the same
    way). end_positions: (N,) index of each sequence's end token, whose
    final state is projected. Returns (N, embed_dim).
    """
    length = token_embeddings.shape[1]
    if length > clip_model.positional_embedding.shape[0]:
        raise ValueError(f"a text context of {length} tokens exceeds the CLIP's text context "
                         f"length {clip_model.positional_embedding.shape[0]}")
    hidden = token_embeddings + clip_model.positional_embedding[:length].to(token_embeddings.dtype)
    hidden = clip_model.transformer(hidden, attn_mask=causal_mask(length, hidden.device, hidden.dtype))
    hidden = clip_model.ln_final(hidden)
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), end_positions]
    projection = clip_model.text_projection
    if projection is None:
        return pooled
    return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection


def text_width(clip_model: CLIP) -> int:
    return int(clip_model.token_embedding.embedding_dim)


def joint_width(clip_model: CLIP) -> int:
    """The joint (image-text) embedding width: 512 at ViT-B/16."""
    projection = clip_model.visual.proj
    if projection is None:
        return visual_width(clip_model.visual)
    return int(projection.shape[1])

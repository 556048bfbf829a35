"""The trained WeakCLIP on disk: ``artifacts/weakclip/model.pt`` and how to rebuild the model from it.

The file holds only what training changed (prompts, adapter, co-attention,
decoder, BN statistics: ``WeakCLIP.trainable_state_dict``), the WeakCLIP config,
the class names and the path + sha256 of the CLIP artifact it was trained on.
The frozen CLIP is rebuilt from that artifact; a CLIP whose weights changed
since is refused, because the learned parts are tied to the features it gave.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from weakclip_core.errors import InputError
from weakclip_core.artifacts.atomic import sha256_of_file
from weakclip_core.models.clip import WEIGHTS_FILE, load_clip_artifact
from weakclip_core.config import WeakClipConfig, build_dataclass, to_plain_without_defaults
from weakclip_core.models.weakclip.model import WeakCLIP
from weakclip_core.artifacts.model_file import load_torch_file, save_final_model


class WeakClipArtifactError(InputError):
    """A trained WeakCLIP file that does not fit its CLIP artifact (the CLIP changed since training)."""


def trainable_modules(model: WeakCLIP) -> nn.ModuleDict:
    """The WeakCLIP's children other than the frozen CLIP, sharing its tensors.

    Its ``state_dict`` has exactly the keys of ``model.trainable_state_dict()``,
    so checkpoints and the final file hold the learned parts and never the CLIP.
    """
    modules = nn.ModuleDict({name: child for name, child in model.named_children()
                             if name != "clip" and child is not None})
    if set(modules.state_dict()) != set(model.trainable_state_dict()):
        raise RuntimeError("WeakCLIP holds trainable tensors outside its child modules; "
                           "trainable_modules would miss them")
    return modules


def clip_weights_sha256(clip_dir: str | Path) -> str:
    return sha256_of_file(Path(clip_dir) / WEIGHTS_FILE)


# Training keys a model file records only when they differ from their default, so that a file trained with the
# defaults stays byte for byte what it was before they existed (loading fills the defaults back in).
KEYS_RECORDED_WHEN_SET: tuple[tuple[str, str], ...] = (
    ("loss", "aux_form"), ("train", "clip_drop_path_unit"), ("train", "lr_schedule"), ("train", "decoder_init"))


def save_weakclip_model(path: str | Path, model: WeakCLIP, cfg: WeakClipConfig, clip_dir: str | Path,
                        **metadata: Any) -> None:
    """Write the final model file atomically (see the module docstring for its contents)."""
    config = to_plain_without_defaults(cfg, KEYS_RECORDED_WHEN_SET)  # the reference-fidelity keys of 2026-12-04
    if cfg.seeds.source == "cams":  # the import keys (issue #18) only when used: a CAM-seeded run's file stays
        for key in ("source", "mask_folder"):  # byte for byte what it was before them
            config["seeds"].pop(key)
    save_final_model(path, trainable_modules(model), config=config, class_names=model.class_names,
                     clip_artifact=str(clip_dir), clip_sha256=clip_weights_sha256(clip_dir), **metadata)


def load_weakclip_model(path: str | Path, clip_dir: str | Path | None = None) -> WeakCLIP:
    """Rebuild the trained WeakCLIP (eval mode, CPU) from ``path`` and its CLIP artifact.

    ``clip_dir`` overrides the CLIP artifact path recorded in the file (e.g. a
    moved workspace); its weights must still have the recorded sha256.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: trained WeakCLIP not found (run the weakclip_train stage)")
    saved = load_torch_file(path, "trained WeakCLIP")  # weights_only: a planted payload never runs
    clip_dir = Path(clip_dir if clip_dir is not None else saved["clip_artifact"])
    if not (clip_dir / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{clip_dir / WEIGHTS_FILE} (the CLIP that {path} adapts) does not exist: "
                                f"run the clip stage first")
    if clip_weights_sha256(clip_dir) != saved["clip_sha256"]:
        raise WeakClipArtifactError(f"{path}: trained on a CLIP with sha256 {saved['clip_sha256'][:12]}..., but "
                         f"{clip_dir / WEIGHTS_FILE} differs (re-run weakclip_train)")
    cfg = build_dataclass(WeakClipConfig, saved["config"], "weakclip")
    model = WeakCLIP(load_clip_artifact(clip_dir), list(saved["class_names"]), cfg.arch())
    model.load_trainable_state_dict(saved["model"])
    return model.eval()

"""A trained model's file: ``{"model": state_dict, "config": plain dict, **metadata}``, written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from weakclip_core.artifacts.atomic import atomic_path


def save_final_model(path: str | Path, model: torch.nn.Module, config: dict[str, Any], **metadata: Any) -> None:
    """The stage's declared output: ``{"model": state_dict, "config": ..., **metadata}``, atomically."""
    # Saved through a stream: given a path, torch names the zip's root folder after the (random) temporary
    # file name, so identical weights would give different bytes (and a different DVC hash) on every run.
    with atomic_path(path) as temporary_path, open(temporary_path, "wb") as stream:
        torch.save({"model": model.state_dict(), "config": config, **metadata}, stream)

"""Resumable training checkpoints for every trainer (cam_train, clip, weakclip_train, seg_train).

``Checkpointer`` writes periodic, atomic checkpoints (model, optimizer, step, config, RNG state) in a
folder outside the stage's DVC outputs (DVC deletes declared outputs before re-running a stage), keyed by
a hash of the config so that a changed config never resumes a stale run. A stage that dies resumes from
the last one.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weakclip_core.artifacts.atomic import atomic_path

CHECKPOINT_ROOT = Path("checkpoints")
CHECKPOINT_FORMAT = 2  # 2: the training loop's window state under extra["loop"]


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a plain config dict (used to key checkpoint folders)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def capture_rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpointer:
    """Save and resume training state under ``checkpoints/<stage>/<config hash>/last.pt``.

    The checkpoint dict holds ``model``, ``optimizer``, ``step``, ``config``,
    ``rng`` and any ``extra`` state (e.g. a data-order generator).
    """

    stage: str
    config: dict[str, Any]
    root: Path = CHECKPOINT_ROOT

    @property
    def folder(self) -> Path:
        # The format is part of the key: a checkpoint laid out by an older trainer is never resumed.
        return self.root / self.stage / config_hash({**self.config, "checkpoint_format": CHECKPOINT_FORMAT})

    @property
    def path(self) -> Path:
        return self.folder / "last.pt"

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
             extra: dict[str, Any] | None = None) -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "config": self.config, "rng": capture_rng_state(), "extra": extra or {}}
        with atomic_path(self.path) as temporary_path, open(temporary_path, "wb") as stream:
            torch.save(state, stream)  # a stream, not the path: torch names the archive after the file

    def load(self) -> dict[str, Any] | None:
        """The last checkpoint of this config, or ``None`` when there is none."""
        if not self.path.is_file():
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("config") != self.config:
            return None
        return state

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, dict[str, Any]]:
        """Load model/optimizer/RNG from the last checkpoint; returns (next step, extra) or (0, {})."""
        state = self.load()
        if state is None:
            return 0, {}
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])
        return int(state["step"]), state.get("extra", {})

    def clear(self) -> None:
        """Remove this stage's checkpoints once its final output is written."""
        shutil.rmtree(self.root / self.stage, ignore_errors=True)

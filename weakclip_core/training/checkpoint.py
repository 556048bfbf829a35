"""Shared training plumbing for every trainer (cam_train, clip, weakclip_train, seg_train).

- ``warmup_cosine_lr``: linear warm-up then cosine decay, as a pure function of the step.
- ``poly_lr``: DeepLab's poly schedule.
- ``Checkpointer``: periodic, atomic checkpoints (model, optimizer, step, config, RNG
  state) in a folder outside the stage's DVC outputs (DVC deletes declared outputs
  before re-running a stage), keyed by a hash of the config so that a changed
  config never resumes a stale run. A stage that dies resumes from the last one.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weakclip_core.artifacts.atomic import atomic_path, write_text

CHECKPOINT_ROOT = Path("checkpoints")


def warmup_cosine_lr(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate at ``step`` (0-based): linear warm-up from base_lr/warmup to base_lr, cosine to min_lr."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def poly_lr(step: int, total_steps: int, base_lr: float, power: float = 0.9) -> float:
    """DeepLab's poly schedule: base_lr * (1 - step/total)^power."""
    return base_lr * (1.0 - min(step, total_steps) / max(1, total_steps)) ** power


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


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
        return self.root / self.stage / config_hash(self.config)

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


def trim_live_history(live_dir: str | Path, first_dropped_step: int) -> None:
    """Drop dvclive plot rows at ``step >= first_dropped_step`` before a resumed run logs again.

    A run killed after logging a row but before the checkpoint that covers it is resumed from the
    earlier checkpoint and logs that row again; without trimming, the plot would hold it twice.
    Each ``plots/metrics/**/*.tsv`` (first column ``step``) is rewritten atomically.
    """
    for table in sorted((Path(live_dir) / "plots" / "metrics").rglob("*.tsv")):
        header, *rows = table.read_text().splitlines(keepends=True)
        kept = [row for row in rows if row.strip() and int(float(row.split("\t", 1)[0])) < first_dropped_step]
        if len(kept) != len(rows):
            write_text(table, header + "".join(kept))


def save_final_model(path: str | Path, model: torch.nn.Module, config: dict[str, Any], **metadata: Any) -> None:
    """The stage's declared output: ``{"model": state_dict, "config": ..., **metadata}``, atomically."""
    # Saved through a stream: given a path, torch names the zip's root folder after the (random) temporary
    # file name, so identical weights would give different bytes (and a different DVC hash) on every run.
    with atomic_path(path) as temporary_path, open(temporary_path, "wb") as stream:
        torch.save({"model": model.state_dict(), "config": config, **metadata}, stream)

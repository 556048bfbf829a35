"""Resumable training checkpoints for every trainer (cam_train, clip, weakclip_train, seg_train).

``Checkpointer`` writes periodic, atomic checkpoints (model, optimizer, step, config, RNG state) in a
folder outside the stage's DVC outputs (DVC deletes declared outputs before re-running a stage), keyed by
a hash of the config so that a changed config never resumes a stale run. A stage that dies resumes from
the last one.

Each checkpoint also records the sha256 of every ``.py`` file of the project's code (``weakclip_core`` and
``pipeline``): a checkpoint of the same config written by other code (a run killed, the code edited, the
stage re-run) is refused with a one-line :class:`CheckpointCodeError` naming the checkpoint and the files that
differ, rather than silently continuing weights the old code trained under the new code's name. Only files
the resuming process has imported count (an edit to the report or to another stage's module is no reason). The user
decides: delete ``checkpoints/<stage>/`` to start over, or set ``WEAKCLIP_RESUME_OTHER_CODE=1`` to resume it
anyway (e.g. after a fix that only touches what runs after training). Nothing is deleted either way.

A checkpoint holds plain data only (tensors, numbers, strings, lists, tuples, dicts): the RNG states are
converted on save (:func:`capture_rng_state`) and back on resume, and :meth:`Checkpointer.load` reads with
``torch.load(weights_only=True)`` (``load_torch_file``), so a file planted in ``checkpoints/`` runs no code;
it is refused with a one-line error naming it, before its config is even compared.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import sys
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weakclip_core.artifacts.atomic import atomic_path
from weakclip_core.artifacts.model_file import load_torch_file
from weakclip_core.errors import InputError

CHECKPOINT_ROOT = Path("checkpoints")
CHECKPOINT_FORMAT = 3  # 2: the training loop's window state under extra["loop"]; 3: plain-data RNG state
CODE_PACKAGES = ("weakclip_core", "pipeline")  # whose .py files a checkpoint records (the stages' code)
RESUME_OTHER_CODE_ENV = "WEAKCLIP_RESUME_OTHER_CODE"  # "1": resume a checkpoint that other code wrote


class CheckpointCodeError(InputError):
    """A checkpoint of this config was written by other code; the message names it and the files that differ."""


def code_digests(packages: tuple[str, ...] = CODE_PACKAGES) -> dict[str, str]:
    """sha256 of every ``.py`` file of ``packages``, keyed by its path from the packages' parent folder
    (``pipeline/seg_train.py``). Files, not the modules a process happened to import: the same checkout gives
    the same record whatever ran before in the process."""
    digests: dict[str, str] = {}
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            continue
        package_dir = Path(spec.origin).parent
        for source in sorted(package_dir.rglob("*.py")):
            relative = source.relative_to(package_dir.parent).as_posix()
            digests[relative] = hashlib.sha256(source.read_bytes()).hexdigest()
    return digests


def imported_code_files(packages: tuple[str, ...] = CODE_PACKAGES) -> set[str]:
    """The files of ``packages`` this process has imported, named as :func:`code_digests` names them: the code
    a training run executes (a stage imports what it runs at its top), not the whole project."""
    parents = {Path(spec.origin).parent.parent for package in packages
               if (spec := importlib.util.find_spec(package)) is not None and spec.origin is not None}
    files = set()
    for module in list(sys.modules.values()):
        source = getattr(module, "__file__", None)
        if not source:
            continue
        path = Path(source)
        for parent in parents:
            if path.is_relative_to(parent) and path.relative_to(parent).parts[0] in packages:
                files.add(path.relative_to(parent).as_posix())
    return files


def differing_files(saved: dict[str, str], current: dict[str, str]) -> list[str]:
    """The files whose record differs between two :func:`code_digests` (changed, added or removed), sorted."""
    return sorted(name for name in saved.keys() | current.keys() if saved.get(name) != current.get(name))


def listed(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def config_hash(config: dict[str, Any]) -> str:
    """A short stable hash of a plain config dict (used to key checkpoint folders)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def capture_rng_state() -> dict[str, Any]:
    """Python's, numpy's and torch's RNG states as plain data (``weights_only``-loadable: no ndarray)."""
    python_version, python_internal, python_gauss = random.getstate()
    numpy_kind, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state(legacy=True)
    return {"python": {"version": int(python_version), "internal": [int(value) for value in python_internal],
                       "gauss_next": python_gauss},
            "numpy": {"kind": str(numpy_kind), "keys": torch.from_numpy(numpy_keys.astype(np.int64)),
                      "pos": int(numpy_pos), "has_gauss": int(numpy_has_gauss), "cached_gaussian": float(numpy_gauss)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else []}


def cuda_rng_state_to_restore(saved: Any) -> torch.Tensor | None:
    """The CUDA generator state a process restores on its own device (``torch.cuda.current_device()``, which a
    torchrun rank sets to its GPU), from what a checkpoint holds: the saving process's own device's state; a
    list (every device rank 0 saw, written before 2026-12-04) gives its first, rank 0's own. One state for every
    rank is right: the ranks seed alike and draw alike, so their streams are one (docs/ORCHESTRATION.md). A
    list per visible device, restored whole, failed with an IndexError where fewer GPUs were visible at resume
    and set each other rank's generator to rank 0's untouched copy of its GPU."""
    if isinstance(saved, torch.Tensor):
        return saved
    if isinstance(saved, (list, tuple)) and saved:
        return saved[0]
    return None


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state` exactly (the same draws follow)."""
    python, numpy_state = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss_next"]))
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda_state = cuda_rng_state_to_restore(state.get("cuda"))
    if cuda_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state)


@dataclass
class Checkpointer:
    """Save and resume training state under ``checkpoints/<stage>/<config hash>/last.pt``.

    The checkpoint dict holds ``model``, ``optimizer``, ``step``, ``config``,
    ``rng`` and any ``extra`` state (e.g. a data-order generator).
    """

    stage: str
    config: dict[str, Any]
    root: Path = CHECKPOINT_ROOT
    code: dict[str, str] = field(default_factory=code_digests)  # this checkout's record (a test may pass its own)

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
                 "config": self.config, "code": self.code, "rng": capture_rng_state(), "extra": extra or {}}
        with atomic_path(self.path) as temporary_path, open(temporary_path, "wb") as stream:
            torch.save(state, stream)  # a stream, not the path: torch names the archive after the file

    def load(self) -> dict[str, Any] | None:
        """The last checkpoint of this config, or ``None`` when there is none.

        Read with ``weights_only=True``: a file holding anything but plain data raises
        ``UnsafeTorchFileError`` naming it (its code never runs, whatever its config). One of this config
        that other code wrote raises :class:`CheckpointCodeError` (unless ``WEAKCLIP_RESUME_OTHER_CODE=1``,
        which resumes it with a note on stderr); the file is left as it was."""
        if not self.path.is_file():
            return None
        state = load_torch_file(self.path, "training checkpoint")
        if not isinstance(state, dict) or state.get("config") != self.config:
            return None
        saved_code = state.get("code")
        if saved_code != self.code:
            if isinstance(saved_code, dict):
                running = imported_code_files()  # an edit this process does not run (the report, another
                differ = [name for name in differing_files(saved_code, self.code) if name in running]  # stage)
                if not differ:
                    return state
                reason = listed(differ)
            else:
                reason = "unknown (written before checkpoints recorded their code)"
            described = (f"{self.path}: a checkpoint of this config at step {state.get('step')} was written by "
                         f"other code (differing files: {reason})")
            if os.environ.get(RESUME_OTHER_CODE_ENV) != "1":
                raise CheckpointCodeError(
                    f"{described}; delete {self.root / self.stage} to start over with this code, or set "
                    f"{RESUME_OTHER_CODE_ENV}=1 to resume it anyway")
            print(f"{described}; resuming it anyway ({RESUME_OTHER_CODE_ENV}=1)", file=sys.stderr)
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

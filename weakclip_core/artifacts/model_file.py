"""A trained model's file: ``{"model": state_dict, "config": plain dict, **metadata}``, written atomically,
and :func:`load_torch_file`, the one way the library reads a ``.pt`` file it did not just write.

Model files and checkpoints come back from shared DVC remotes and caches, so nothing in them may run code
when read: every reader loads with ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists,
tuples, dicts only) through :func:`load_torch_file`, and everything the writers save is such plain data.
A file that holds anything else (a pickled object, a planted ``__reduce__`` payload) is refused without
running it, with an :class:`UnsafeTorchFileError` naming the file.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from weakclip_core.artifacts.atomic import atomic_path
from weakclip_core.errors import InputError

NOT_TRAINED_FILE = "not_trained.json"
"""What a training stage writes in its model folder instead of ``model.pt`` when it has nothing to train
(``seg_train@gt`` without GT, ``cam_train`` with imported CAMs): ``{"trained": false, "not_trained": why}``."""


class UnsafeTorchFileError(InputError):
    """A ``.pt`` file that ``torch.load(weights_only=True)`` refuses: it holds more than plain data."""


def unpickling_reason(error: BaseException) -> str:
    """The one line that says why torch's weights-only unpickler refused a file (its message is a page)."""
    text = str(error)
    match = re.search(r"WeightsUnpickler error:\s*(.+)", text, flags=re.DOTALL)
    reason = match.group(1) if match else text
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    reason = lines[0] if lines else type(error).__name__
    reason = reason.split(" Please use ")[0].split(" Please file an issue")[0]
    return re.sub(r"\x1b\[[0-9;]*m", "", reason).rstrip(".")[:300]


def load_torch_file(path: str | Path, what: str = "file") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file that holds anything but plain data (tensors,
    numbers, strings, lists, tuples, dicts) raises :class:`UnsafeTorchFileError` naming ``path`` — its code
    never runs. ``what`` names the file's role in the message (``"trained MCTformer"``)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeTorchFileError(
            f"{path}: refused to load this {what}: it holds more than plain tensors and data "
            f"({unpickling_reason(error)}); it may have been tampered with or made by another version of this "
            f"code: delete it and re-run the stage that makes it") from None
    except Exception as error:  # noqa: BLE001 — truncated, not a torch file, ...: any failure means "unreadable"
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise UnsafeTorchFileError(f"{path}: not a readable torch {what} ({type(error).__name__}: {first_line}); "
                                   f"delete it and re-run the stage that makes it") from None


def save_final_model(path: str | Path, model: torch.nn.Module, config: dict[str, Any], **metadata: Any) -> None:
    """The stage's declared output: ``{"model": state_dict, "config": ..., **metadata}``, atomically.

    ``config`` and ``metadata`` must be plain data (what :func:`load_torch_file` accepts). A ``NOT_TRAINED_FILE``
    an earlier run left beside it (the stage had nothing to train then; DVC empties the output folder before it
    runs a stage, a direct ``python -m pipeline.<stage>`` does not) is removed, so the folder says one thing and
    hashes as DVC's run of the same stage would."""
    # Saved through a stream: given a path, torch names the zip's root folder after the (random) temporary
    # file name, so identical weights would give different bytes (and a different DVC hash) on every run.
    with atomic_path(path) as temporary_path, open(temporary_path, "wb") as stream:
        torch.save({"model": model.state_dict(), "config": config, **metadata}, stream)
    (Path(path).parent / NOT_TRAINED_FILE).unlink(missing_ok=True)


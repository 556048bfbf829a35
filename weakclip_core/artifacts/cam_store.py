"""The CAM store: per-image class activation maps in one HDF5 file (docs/ARCHITECTURE.md, "CAM store").

Layout: one group per image id; dataset ``cams`` float16 ``(n_present, H, W)``
in [0, 1] at the image's size; group attribute ``classes`` = the present
foreground class indices, in order. File attributes: ``dataset``,
``class_names`` (JSON), ``params`` (JSON of what made it), ``complete`` = 1
once every image is in.

The writer writes to a temporary name and renames on ``close()`` only, so a
killed writer never leaves a file under the final name. The reader opens the
file lazily on first access, so a ``torch`` DataLoader worker that receives a
pickled reader opens its own handle (h5py handles must not cross ``fork``).
"""

from __future__ import annotations

from weakclip_core.errors import InputError
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from weakclip_core.artifacts.atomic import temporary_prefix, umask


class CamStoreError(InputError):
    """The CAM store is missing, incomplete, or disagrees with the dataset; the message names the file."""


class CamStoreWriter:
    """Write CAMs image by image; ``close()`` marks the file complete and renames it into place."""

    def __init__(self, path: str | Path, dataset_name: str, class_names: list[str], params: dict[str, Any]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary_name = tempfile.mkstemp(prefix=temporary_prefix(self.path), suffix=".tmp",
                                                  dir=self.path.parent)
        os.close(handle)
        self.temporary_path = Path(temporary_name)
        self.n_classes = len(class_names)
        self._file = h5py.File(self.temporary_path, "w")
        self._file.attrs["dataset"] = dataset_name
        self._file.attrs["class_names"] = json.dumps(class_names)
        self._file.attrs["params"] = json.dumps(params, sort_keys=True)
        self._file.attrs["complete"] = 0

    def add(self, image_id: str, classes: list[int], cams: np.ndarray) -> None:
        """Store ``cams`` (n_present, H, W) in [0, 1] for the foreground ``classes`` of ``image_id``."""
        if cams.ndim != 3 or cams.shape[0] != len(classes):
            raise ValueError(f"CAMs of {image_id}: expected ({len(classes)}, H, W), got {cams.shape}")
        if any(not 1 <= c < self.n_classes for c in classes):
            raise ValueError(f"CAMs of {image_id}: class indices {classes} outside 1..{self.n_classes - 1}")
        if not np.isfinite(cams).all() or cams.min(initial=0.0) < 0.0 or cams.max(initial=0.0) > 1.0:
            raise ValueError(f"CAMs of {image_id}: values must be finite and in [0, 1]")
        group = self._file.create_group(image_id)
        chunks = (1, min(cams.shape[1], 256), min(cams.shape[2], 256)) if cams.shape[0] else None
        group.create_dataset("cams", data=cams.astype(np.float16), compression="gzip", compression_opts=4,
                             shuffle=True, chunks=chunks)
        group.attrs["classes"] = np.asarray(classes, dtype=np.int64)

    def close(self) -> Path:
        """Mark complete, flush and rename into place; returns the final path."""
        self._file.attrs["complete"] = 1
        self._file.close()
        os.chmod(self.temporary_path, 0o666 & ~umask())  # mkstemp made it 0o600: readable by others as any output
        os.replace(self.temporary_path, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial file (the final path is untouched)."""
        try:
            self._file.close()
        finally:
            self.temporary_path.unlink(missing_ok=True)

    def __enter__(self) -> "CamStoreWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class CamStoreReader:
    """Lazy, picklable reader: the HDF5 handle is opened on first use in each process."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CamStoreError(f"{self.path}: CAM store not found (run the cam_infer stage)")
        self._file: h5py.File | None = None
        self._pid: int | None = None
        with h5py.File(self.path, "r") as probe:
            if int(probe.attrs.get("complete", 0)) != 1:
                raise CamStoreError(f"{self.path}: CAM store is incomplete (its writer did not finish)")
            self.dataset_name = str(probe.attrs["dataset"])
            self.class_names: list[str] = json.loads(probe.attrs["class_names"])
            self.params: dict[str, Any] = json.loads(probe.attrs["params"])
            self.image_ids: list[str] = list(probe.keys())

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state

    def _handle(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._handle()

    def read(self, image_id: str) -> tuple[list[int], np.ndarray]:
        """(classes, cams float32 (n_present, H, W)) for ``image_id``."""
        handle = self._handle()
        if image_id not in handle:
            raise CamStoreError(f"{self.path}: no CAMs for image {image_id}")
        group = handle[image_id]
        return [int(c) for c in group.attrs["classes"]], group["cams"][()].astype(np.float32)

    def check_matches(self, class_names: list[str], image_ids: list[str]) -> None:
        """Stop with a clear message when the store was made for other classes or lacks images."""
        if self.class_names != class_names:
            raise CamStoreError(f"{self.path}: made for {len(self.class_names)} classes {self.class_names[:4]}..., "
                                f"the dataset has {len(class_names)} {class_names[:4]}...")
        present = set(self.image_ids)
        missing = [i for i in image_ids if i not in present]
        if missing:
            raise CamStoreError(f"{self.path}: {len(missing)} image(s) have no CAMs, e.g. {missing[0]}")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

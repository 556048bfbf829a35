"""Read a pickled ``.npy`` dict (MCTformer's ``cls_labels.npy`` and CAM dumps) without running code from it.

MCTformer writes these files with ``np.save(path, some_dict)``: a 0-d object array, i.e. a pickle, and
``np.load(..., allow_pickle=True)`` would run whatever a tampered file asks for (the same risk as
an unrestricted ``torch.load``). Here the pickle is read by an unpickler that knows only the few numpy
names an array of numbers needs; anything else is refused.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from weakclip_core.errors import InputError

# What ``np.save`` of a dict of arrays and numbers refers to (numpy 1.x wrote ``numpy.core``, 2.x ``numpy._core``).
ALLOWED_GLOBALS = frozenset({
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype")})


class RefusedPickleError(InputError, pickle.UnpicklingError):
    """The pickle asked for a name outside ``ALLOWED_GLOBALS`` (an input error; still an ``UnpicklingError``)."""


class _NumbersOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:  # noqa: ANN401 (pickle's protocol)
        if (module, name) not in ALLOWED_GLOBALS:
            raise RefusedPickleError(f"it asks for {module}.{name}, which an array of numbers never needs")
        return super().find_class(module, name)


def load_pickled_npy(path: str | Path) -> Any:  # noqa: ANN401 (whatever plain data the file holds)
    """The object a ``np.save`` of a dict (or of any array) stored in ``path``, read without executing code.

    Plain (non-object) arrays are read as numpy reads them; a 0-d object array gives the object inside it.
    Raises ``OSError``/``ValueError`` for an unreadable file and :class:`RefusedPickleError` (an
    ``UnpicklingError``) for a pickle that names anything but numpy's array reconstruction.
    """
    data = Path(path).read_bytes()
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    if not dtype.hasobject:
        return np.load(io.BytesIO(data), allow_pickle=False)
    loaded = _NumbersOnlyUnpickler(stream).load()
    if isinstance(loaded, np.ndarray) and loaded.dtype.hasobject and loaded.shape == ():
        return loaded.item()
    return loaded

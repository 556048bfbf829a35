"""Device choice, numeric precision and seeding, explicit and passed around (no global state kept here)."""

from __future__ import annotations

import contextlib
import os
import random
from typing import get_args

import numpy as np
import torch

from weakclip_core.config.params import Precision
from weakclip_core.errors import InputError


def resolve_device(requested: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is a clear error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device: 'cuda' was requested but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(requested)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; returns a torch generator seeded the same, for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def set_threads(threads: int) -> None:
    """``threads: 0`` keeps torch's default (all cores); otherwise pin intra-op threads."""
    if threads > 0:
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


PRECISIONS: tuple[str, ...] = get_args(Precision)
"""``runtime.precision``'s values, read from the config's ``Precision`` type (one list, not two)."""


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in at ``runtime.precision``.

    ``fp32``: a null context, not ``torch.autocast(enabled=False)``, so the fp32 path is exactly the code that
    ran before the key existed (bit-identical results). ``bf16``: ``torch.autocast`` on the device's type with
    bfloat16 (matmuls and convolutions in bf16, reductions and losses as autocast decides); its fp32 range
    needs no loss scaling, unlike fp16, which is why fp16 is not offered. A fresh context per call: enter it
    once. A GPU without bfloat16 (before Ampere) is refused naming the key, not deep inside torch.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        # including_emulation=False: torch's default also says yes where bf16 only runs emulated (V100, T4:
        # compute capability < 8), slow kernels instead of this refusal
        if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
            raise InputError(f"runtime.precision: bf16 needs a GPU with bfloat16 support, and "
                             f"{torch.cuda.get_device_name(device)} has none; use fp32")
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise InputError(f"runtime.precision must be one of {list(PRECISIONS)}, got {precision!r}")

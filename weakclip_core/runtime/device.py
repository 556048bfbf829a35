"""Device choice and seeding, explicit and passed around (no global state kept here)."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


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

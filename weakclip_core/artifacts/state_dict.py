"""Getting the bare state dict out of a checkpoint someone else saved.

Published checkpoints wrap their weights in different ways: DeiT's under ``model``, Lightning /
mmcv ones under ``state_dict``, a ``DistributedDataParallel`` save with every key under ``module.``,
a ``torch.compile``d model under ``_orig_mod.``. The loaders of pretrained weights (MCTformer's DeiT
backbone, the segmenter's encoder) all unwrap the same way, here.
"""

from __future__ import annotations

from typing import Any

WRAPPER_KEYS: tuple[str, ...] = ("model", "state_dict")
"""Keys a checkpoint may keep its state dict under (looked into until none applies)."""

WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
"""Key prefixes of a DDP-wrapped or compiled model, stripped when every key carries one."""


def strip_common_prefix(state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``state_dict`` without ``prefix`` when every key starts with it; else unchanged."""
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        return {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def unwrap_state_dict(checkpoint: Any, extra_prefixes: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The innermost state dict of ``checkpoint`` with wrapper prefixes stripped; ``None`` if it holds none.

    Descends into ``model`` / ``state_dict`` while the current mapping has one of them as a mapping,
    then strips ``module.`` / ``_orig_mod.`` and ``extra_prefixes`` (e.g. ``encoder.``), each when
    every key carries it, repeating until no prefix applies (``module._orig_mod.x`` → ``x``). The
    caller checks what the values are and raises its own error naming the file.
    """
    state = checkpoint
    while isinstance(state, dict):
        inner = next((state[key] for key in WRAPPER_KEYS if isinstance(state.get(key), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict):
        return None
    prefixes = WRAPPER_PREFIXES + tuple(extra_prefixes)
    while True:
        stripped = state
        for prefix in prefixes:
            stripped = strip_common_prefix(stripped, prefix)
        if stripped is state:
            return state
        state = stripped

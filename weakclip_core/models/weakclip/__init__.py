"""WeakCLIP (Zhu et al., IJCV 2024): one module per part of the paper, composed in ``model.py``.

Built from a ``WeakClipArchConfig`` (``weakclip_core.config.weakclip``); the paper's is ``paper_weakclip_arch()``.
"""

from weakclip_core.models.weakclip.model import WeakCLIP, WeakClipOutput

__all__ = ["WeakCLIP", "WeakClipOutput"]

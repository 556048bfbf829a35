"""WeakCLIP (Zhu et al., IJCV 2024): one module per part of the paper, composed in ``model.py``."""

from weakclip_core.models.weakclip.model import WeakCLIP, WeakClipOutput, paper_weakclip_config

__all__ = ["WeakCLIP", "WeakClipOutput", "paper_weakclip_config"]

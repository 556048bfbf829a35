"""The WeakCLIP paper's architecture at CLIP ViT-B/16 (Zhu et al., IJCV 2024; docs/METHOD.md §2).

The one place these numbers are written. ``WeakClipConfig``'s defaults are
these constants, so ``paper_weakclip_arch()`` and ``paper_weakclip_config()``
(``weakclip_core.config.weakclip``) give the paper's model; the presets
``configs/voc.yaml`` and ``configs/coco.yaml`` spell them out again for
``make preset`` and ``tests/test_presets.py`` checks that they still equal
these. The synthetic default (``params.yaml``) is narrower on purpose.

With them the model has docs/METHOD.md's parameter counts at input 512 and K = 21
(``tests/test_weakclip_parity.py``): 171.46M in all, 21.24M trainable.
"""

from __future__ import annotations

from typing import Final

PROMPT_LEN: Final[int] = 8                 # N learnable context vectors (512-d) after the start token
TEXT_CONTEXT_LENGTH: Final[int] = 13       # 8 contexts + 5 slots for [SOT] name tokens [EOT]
TEMPERATURE_INIT: Final[float] = 0.1       # α, β of the co-attention, per channel
TAPS: Final[tuple[int, ...]] = (3, 5, 7, 11)  # 0-based ViT blocks feeding the 1/4, 1/8, 1/16, 1/32 levels
CO_ATTENTION: Final[bool] = True
CO_ATTENTION_WIDTH: Final[int] = 256       # co-attention: 6.84M parameters
CO_ATTENTION_HEADS: Final[int] = 4
CO_ATTENTION_LAYERS: Final[int] = 3
NECK_WIDTH: Final[int] = 256               # FPN neck: 1x1 laterals and 3x3 outputs (3.17M at K = 21)
HEAD_WIDTH: Final[int] = 256               # semantic-FPN head's conv-BN-ReLU blocks (4.14M at K = 21);
                                           # not an attention head width
DROPOUT: Final[float] = 0.1                # before the decoder's 1x1 classifier; also in the co-attention

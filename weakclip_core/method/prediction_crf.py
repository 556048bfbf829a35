"""The retrained segmenter's test-time CRF: a dense CRF over the classes its prediction shows.

The reference retraining (Yingyue-L/deeplabv1-resnet38, linked from hustvl/WeakCLIP's README) scores its
segmenter with multi-scale + flip inference, then ``tools/make_crf.py``: it keeps the classes that win
somewhere in the argmax, soft-maxes their scores again, runs the dense CRF on those rows only and maps the
CRF's argmax back to the classes kept. A class the argmax never shows can therefore not appear after the CRF.

Here the segmenter's scores arrive as probabilities averaged over the views (``weakclip_core.method.
inference``); renormalising the kept rows of a softmax equals the softmax of the kept rows of its logits, so
for one view this is the reference's computation exactly (over several views the reference averages logits,
we average probabilities: docs/METHOD_NOTES.md). The image is the one the probabilities belong to (the
colour kernel reads it); nothing here knows about files or processes.
"""

from __future__ import annotations

import numpy as np

from weakclip_core.config.weakclip import CrfConfig
from weakclip_core.method.crf import dense_crf


def crf_prediction(image: np.ndarray, probabilities: np.ndarray, cfg: CrfConfig) -> np.ndarray:
    """(H, W) uint8 class ids: the dense CRF's argmax over the classes ``probabilities``' argmax shows.

    image: (H, W, 3) uint8 RGB; probabilities: (K, H, W), row k for class k, each pixel summing to 1.
    With one class shown the CRF has nothing to decide and the argmax is returned as is.
    """
    if probabilities.ndim != 3 or image.shape[:2] != probabilities.shape[1:]:
        raise ValueError(f"crf_prediction: image {image.shape[:2]} and probabilities {probabilities.shape} "
                         f"do not match (expected (K, H, W) at the image's size)")
    shown = np.unique(probabilities.argmax(axis=0))
    if len(shown) == 1:
        return np.full(probabilities.shape[1:], shown[0], dtype=np.uint8)
    kept = probabilities[shown].astype(np.float32)
    kept /= kept.sum(axis=0, keepdims=True)
    return shown.astype(np.uint8)[dense_crf(image, kept, cfg).argmax(axis=0)]


def crf_prediction_job(job: tuple[np.ndarray, np.ndarray, CrfConfig]) -> np.ndarray:
    """:func:`crf_prediction` of one ``(image, probabilities, cfg)`` job (a process pool's picklable callable)."""
    return crf_prediction(*job)

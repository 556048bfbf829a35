"""The retrained segmenter's test-time CRF: a dense CRF over the classes its prediction shows.

The reference retraining (Yingyue-L/deeplabv1-resnet38, linked from hustvl/WeakCLIP's README) scores its
segmenter with multi-scale + flip inference, then ``tools/make_crf.py``: it keeps the classes that win
somewhere in the argmax, soft-maxes their scores again, runs the dense CRF on those rows only (the unary
``pydensecrf.utils.unary_from_softmax``: -log of the probabilities floored at 1e-5) and maps the CRF's argmax
back to the classes kept. A class the argmax never shows can therefore not appear after the CRF.

Here the segmenter's scores arrive as probabilities averaged over the views (``weakclip_core.method.
inference``); renormalising the kept rows of a softmax equals the softmax of the kept rows of its logits, so
for one view this is the reference's computation (over several views the reference averages logits, we
average probabilities: docs/METHOD_NOTES.md). :func:`shown_classes` (or :func:`shown_classes_on_device`, on
the model's device) runs where the probabilities are, so only the few kept rows travel to the host and to a CRF
worker process (:func:`crf_on_shown_job`); nothing here knows about files.
"""

from __future__ import annotations

import numpy as np
import torch

from weakclip_core.config.weakclip import CrfConfig
from weakclip_core.method.crf import dense_crf

REFERENCE_UNARY_FLOOR = 1e-5
"""``pydensecrf.utils.unary_from_softmax``'s default ``clip``, which ``make_crf`` uses."""


def shown_classes(probabilities: np.ndarray, always: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(the classes ``probabilities``' argmax shows, and ``always``'s, ascending, uint8; their rows renormalised,
    float32). Renormalising a subset shifts every class's log-probability at a pixel by the same constant, so a
    CRF over the subset decides as over all classes restricted to it (the reference's make_crf step).

    probabilities: (K, H, W), row k for class k, each pixel summing to 1. ``always``: classes kept even where
    the argmax shows none (the pseudo masks keep background, which the absent-class repair weighs against). A
    non-finite value is refused: one NaN pixel would otherwise spread through the CRF's message passing to the
    whole image.
    """
    if probabilities.ndim != 3:
        raise ValueError(f"shown_classes: expected (K, H, W) probabilities, got shape {probabilities.shape}")
    if not np.isfinite(probabilities).all():
        raise ValueError(f"shown_classes: the probabilities hold {int((~np.isfinite(probabilities)).sum())} "
                         f"non-finite values (NaN or inf): the model's output is broken")
    shown = np.union1d(probabilities.argmax(axis=0), np.asarray(always, dtype=np.int64))
    kept = probabilities[shown].astype(np.float32)
    kept /= kept.sum(axis=0, keepdims=True)
    return shown.astype(np.uint8), kept


def shown_classes_on_device(probabilities: torch.Tensor,
                            always: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """:func:`shown_classes` of a (K, H, W) tensor, computed where it is, so that from a GPU only the kept rows
    reach the host: on COCO (81 classes, 640x480) the full maps were 100 MB an image, copied and argmaxed on one
    core (0.13-0.17 s an image here, ~1.9 h over val) while the GPU waited. On the CPU numpy's argmax is the
    faster one (0.13 s against torch's 0.22 s for those maps), so a CPU tensor takes :func:`shown_classes`."""
    if probabilities.device.type == "cpu":
        return shown_classes(probabilities.float().numpy(), always)
    return shown_classes_torch(probabilities, always)


def shown_classes_torch(probabilities: torch.Tensor, always: tuple[int, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """:func:`shown_classes` in torch ops on the tensor's device (argmax: the first class of a tie, as numpy's;
    the classes shown found by a count, not a sort)."""
    if probabilities.dim() != 3:
        raise ValueError(f"shown_classes: expected (K, H, W) probabilities, got shape {tuple(probabilities.shape)}")
    finite = torch.isfinite(probabilities)
    if not bool(finite.all()):
        raise ValueError(f"shown_classes: the probabilities hold {int((~finite).sum())} "
                         f"non-finite values (NaN or inf): the model's output is broken")
    present = torch.bincount(probabilities.argmax(dim=0).flatten(), minlength=probabilities.shape[0]) > 0
    present[list(always)] = True
    shown = present.nonzero().flatten()
    kept = probabilities[shown].float()
    kept /= kept.sum(dim=0, keepdim=True)
    return shown.cpu().numpy().astype(np.uint8), kept.cpu().numpy()


def crf_on_shown(image: np.ndarray, classes: np.ndarray, kept: np.ndarray, cfg: CrfConfig) -> np.ndarray:
    """(H, W) uint8 class ids: the dense CRF's argmax over ``kept`` (:func:`shown_classes`' rows, unary floored
    as the reference's), mapped back through ``classes``. With one class shown there is nothing to decide."""
    if image.shape[:2] != kept.shape[1:] or len(classes) != kept.shape[0]:
        raise ValueError(f"crf_on_shown: image {image.shape[:2]}, {len(classes)} classes and kept rows "
                         f"{kept.shape} do not match")
    if len(classes) == 1:
        return np.full(kept.shape[1:], classes[0], dtype=np.uint8)
    floored = np.clip(kept, REFERENCE_UNARY_FLOOR, 1.0)  # dense_crf's own 1e-8 floor then changes nothing
    return classes[dense_crf(image, floored, cfg).argmax(axis=0)]


def crf_prediction(image: np.ndarray, probabilities: np.ndarray, cfg: CrfConfig) -> np.ndarray:
    """(H, W) uint8 class ids: the dense CRF's argmax over the classes ``probabilities``' argmax shows.

    image: (H, W, 3) uint8 RGB (the colour kernel reads it); probabilities: (K, H, W) at the image's size.
    """
    if image.shape[:2] != probabilities.shape[1:]:
        raise ValueError(f"crf_prediction: image {image.shape[:2]} and probabilities {probabilities.shape} "
                         f"do not match (expected (K, H, W) at the image's size)")
    return crf_on_shown(image, *shown_classes(probabilities), cfg)


def crf_on_shown_job(job: tuple[np.ndarray, np.ndarray, np.ndarray, CrfConfig]) -> np.ndarray:
    """:func:`crf_on_shown` of one ``(image, classes, kept, cfg)`` job (a process pool's picklable callable)."""
    return crf_on_shown(*job)

"""Dense CRF (Krähenbühl & Koltun) through pydensecrf2, inline or in a persistent worker pool.

Used by the WeakCLIP boundary loss (Q = CRF(P) on the downsized image) and by
the ``pseudo_masks`` stage (refining predictions). This module imports no
torch, so spawned workers start quickly.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from types import TracebackType

import numpy as np

from weakclip_core.config.weakclip import CrfConfig
from weakclip_core.runtime.processes import die_with_parent

PROBABILITY_FLOOR = 1e-8


def dense_crf(image: np.ndarray, probabilities: np.ndarray, cfg: CrfConfig) -> np.ndarray:
    """Mean-field dense CRF of a per-pixel class distribution.

    image: (H, W, 3) uint8 RGB; probabilities: (K, H, W), each pixel summing to 1.
    Unary = -log(clip(p, 1e-8, 1)); Gaussian kernel (``gaussian_sxy``,
    ``gaussian_compat``) plus bilateral kernel (``bilateral_sxy``,
    ``bilateral_srgb``, ``bilateral_compat``); ``iterations`` mean-field steps.
    Returns Q, (K, H, W) float32.
    """
    import pydensecrf.densecrf as dcrf

    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"dense_crf: image must be (H, W, 3), got {image.shape}")
    classes, height, width = probabilities.shape
    if image.shape[:2] != (height, width):
        raise ValueError(f"dense_crf: image {image.shape[:2]} and probabilities {(height, width)} differ in size")
    unary = -np.log(np.clip(probabilities.astype(np.float32), PROBABILITY_FLOOR, 1.0))
    crf = dcrf.DenseCRF2D(width, height, classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary.reshape(classes, -1), dtype=np.float32))
    crf.addPairwiseGaussian(sxy=cfg.gaussian_sxy, compat=cfg.gaussian_compat)
    crf.addPairwiseBilateral(sxy=cfg.bilateral_sxy, srgb=cfg.bilateral_srgb,
                             rgbim=np.ascontiguousarray(image, dtype=np.uint8), compat=cfg.bilateral_compat)
    refined = np.asarray(crf.inference(cfg.iterations), dtype=np.float32)
    return refined.reshape(classes, height, width)


def _dense_crf_job(job: tuple[np.ndarray, np.ndarray, CrfConfig]) -> np.ndarray:
    return dense_crf(*job)


class CrfPool:
    """Runs :func:`dense_crf` over a batch in ``workers`` processes, created once and reused.

    ``workers: 0`` runs inline in the caller. Use as a context manager (or call
    :meth:`close`) so the processes end with the training run. Workers are
    spawned, not forked: forking a process that has started torch threads can
    deadlock. Spawned workers re-import the main module, so a script that
    creates a pool must keep its work under ``if __name__ == "__main__":``
    (every stage does; ``python -c`` one-liners and pytest are fine).
    """

    def __init__(self, cfg: CrfConfig, workers: int) -> None:
        self.cfg = cfg
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None
        if workers > 0:
            self._executor = ProcessPoolExecutor(max_workers=workers,
                                                 mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=die_with_parent)

    def map(self, images: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """images: (B, H, W, 3) uint8; probabilities: (B, K, H, W) → Q, (B, K, H, W) float32."""
        if images.shape[0] != probabilities.shape[0]:
            raise ValueError(f"CrfPool.map: {images.shape[0]} images but {probabilities.shape[0]} probability maps")
        jobs = [(np.ascontiguousarray(image), np.ascontiguousarray(probability, dtype=np.float32), self.cfg)
                for image, probability in zip(images, probabilities)]
        if self._executor is None:
            results = [_dense_crf_job(job) for job in jobs]
        else:
            results = list(self._executor.map(_dense_crf_job, jobs))
        return np.stack(results).astype(np.float32, copy=False)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> "CrfPool":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

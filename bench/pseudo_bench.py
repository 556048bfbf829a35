"""Throughput of the pseudo_masks stage's two halves, measured in one run: model inference (multi-scale +
flip + sliding window, label-restricted) in images/s, and dense CRF in images/s with 1 and 2 worker
processes (pool start-up excluded).

``python -m bench.pseudo_bench [--images 32] [--out bench/pseudo.json]`` uses the trained WeakCLIP
(``artifacts/weakclip/model.pt``) and the prepared train split of ``params.yaml``; the lead's
``make bench`` calls :func:`run_pseudo_bench`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weakclip_core.artifacts.atomic import write_json
from weakclip_core.config import Params, load_params
from weakclip_core.config.weakclip import CrfConfig
from weakclip_core.method.crf import dense_crf
from weakclip_core.data.layout import PreparedDataset
from weakclip_core.runtime.device import resolve_device, set_threads
from weakclip_core.method.inference import DenseModel, InferenceAugmentation, predict_reduced_batch
from weakclip_core.artifacts.weakclip import load_weakclip_model


def _crf_job(job: tuple[np.ndarray, np.ndarray, CrfConfig]) -> int:
    return int(dense_crf(*job).argmax(axis=0).sum() >= 0)


def crf_images_per_second(images: list[np.ndarray], probabilities: list[np.ndarray], cfg: CrfConfig,
                          workers: int) -> float:
    """Dense CRF throughput over the images with ``workers`` spawned processes (0: inline)."""
    jobs = [(image, probability, cfg) for image, probability in zip(images, probabilities)]
    if workers == 0:
        started = time.perf_counter()
        for job in jobs:
            _crf_job(job)
        return len(jobs) / (time.perf_counter() - started)
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as executor:
        list(executor.map(_crf_job, jobs[:workers]))  # start every worker before the clock runs
        started = time.perf_counter()
        list(executor.map(_crf_job, jobs))
        return len(jobs) / (time.perf_counter() - started)


def bench_dense_model(model: DenseModel, images: list[np.ndarray], labels: list[list[int]], n_classes: int,
                      views: InferenceAugmentation, crf: CrfConfig, batch_size: int, device: torch.device,
                      worker_counts: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    """Inference images/s over ``images`` in batches, then CRF images/s for each worker count."""
    def labelled_rows(start: int) -> list[np.ndarray]:
        """As the stage: each image's background + label rows copied from the device, the rest left there."""
        batch_labels = labels[start:start + batch_size]
        return predict_reduced_batch(
            model, images[start:start + batch_size], batch_labels, n_classes, views,
            lambda index, probability: np.ascontiguousarray(
                probability[[0, *sorted(batch_labels[index])]].float().cpu().numpy()),
            device, max_forward_batch=batch_size)

    predict_reduced_batch(model, images[:1], labels[:1], n_classes, views, lambda index, probability: None,
                          device)  # warm-up
    started = time.perf_counter()
    compact: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        compact += labelled_rows(start)
    inference_rate = len(images) / (time.perf_counter() - started)
    return {"n_images": len(images), "inference_images_per_s": round(inference_rate, 2),
            "crf_images_per_s": {str(workers): round(crf_images_per_second(images, compact, crf, workers), 2)
                                 for workers in worker_counts},
            "scales": list(views.scales), "flip": views.flip, "crop": views.crop, "stride": views.stride,
            "batch_size": batch_size, "device": str(device), "torch_threads": torch.get_num_threads()}


def run_pseudo_bench(params: Params, model_path: Path = Path("artifacts/weakclip/model.pt"),
                     n_images: int = 32) -> dict[str, Any]:
    """The benchmark on the trained WeakCLIP and the first ``n_images`` sorted train images."""
    set_threads(params.runtime.threads)
    device = resolve_device(params.runtime.device)
    weakclip = load_weakclip_model(model_path).to(device).eval()
    dataset = PreparedDataset.open(params.dataset.prepared_dir)
    image_ids = sorted(dataset.split(params.dataset.train_split))[:n_images]
    pseudo = params.pseudo
    views = InferenceAugmentation(tuple(pseudo.scales), pseudo.flip, pseudo.crop, pseudo.stride)
    return bench_dense_model(lambda batch: weakclip(batch).logits, [dataset.image(i) for i in image_ids],
                             [dataset.image_labels(i) for i in image_ids], dataset.n_classes, views, pseudo.crf,
                             pseudo.batch_size, device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--images", type=int, default=32, help="train images to time (default 32)")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    result = run_pseudo_bench(load_params(args.params), n_images=args.images)
    if args.out is not None:
        write_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

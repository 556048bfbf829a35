"""The measurements of ``python -m bench.run``, one function each; ``bench.run`` runs them in child processes.

Every function builds its own random-init model (no weights are needed to time
a step), runs a few warm-up steps, times the next ones and returns a plain dict.
Peak memory is the process's own: CPU peak RSS from ``resource`` (which
includes ~0.5 GiB for importing torch, hence the separate ``train_memory_mib``
= peak growth during the steps), or ``torch.cuda.max_memory_allocated`` on a
GPU. That is why each training measurement runs in a fresh process.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from weakclip_core.artifacts.cam_store import CamStoreWriter
from weakclip_core.models.clip import DenseVisualFeatures, clip_from_config, dense_visual_features, named_model_config
from weakclip_core.config import CrfConfig, MCTformerArchConfig, WeakClipLossConfig
from weakclip_core.config.weakclip import WeakClipArchConfig, paper_weakclip_arch
from weakclip_core.method.crf import CrfPool
from weakclip_core.method.inference import InferenceAugmentation
from weakclip_core.method.losses import weakclip_losses
from weakclip_core.models.mctformer import build_mctformer
from weakclip_core.models.weakclip import WeakCLIP, WeakClipOutput
from weakclip_core.models.weakclip.matching import cosine_matching

VOC_CLASS_COUNT = 21


@dataclass(frozen=True)
class BenchSize:
    """Everything that differs between ``--quick`` (seconds, tiny models) and the full run (the paper's sizes)."""

    name: str
    clip_config: dict[str, Any]
    weakclip: WeakClipArchConfig
    weakclip_loss: WeakClipLossConfig
    input_size: int
    batch_size: int
    warmup_steps: int
    timed_steps: int
    mctformer: MCTformerArchConfig
    n_classes: int  # K, background included
    inference_image: tuple[int, int]
    inference: InferenceAugmentation
    inference_images: int
    crf: CrfConfig
    cam_image: tuple[int, int]
    cam_images: int
    cam_present: int = 2
    notes: dict[str, str] = field(default_factory=dict)


def full_size() -> BenchSize:
    """The paper's models: WeakCLIP on CLIP ViT-B/16 at 512, MCTformer DeiT-S at 224, K = 21 (VOC); WeakCLIP's
    loss as the VOC preset computes it (the auxiliary loss in the reference's form: λ' upsampled to the crop)."""
    voc_pseudo_crf = CrfConfig(iterations=10, gaussian_sxy=3.0, gaussian_compat=3.0, bilateral_sxy=83.0,
                               bilateral_srgb=5.0, bilateral_compat=3.0)
    return BenchSize(
        name="full", clip_config=named_model_config("ViT-B-16", image_size=512), weakclip=paper_weakclip_arch(),
        weakclip_loss=WeakClipLossConfig(aux_form="reference"),
        input_size=512, batch_size=2, warmup_steps=1, timed_steps=3,
        mctformer=MCTformerArchConfig(image_size=224, patch_size=16, width=384, depth=12, heads=6, drop_path=0.1),
        n_classes=VOC_CLASS_COUNT, inference_image=(375, 500),
        inference=InferenceAugmentation(scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flip=True, crop=512, stride=341),
        inference_images=2, crf=voc_pseudo_crf, cam_image=(375, 500), cam_images=16)


def quick_size() -> BenchSize:
    """Tiny models and images: the same code paths in a few seconds (so the benchmark cannot rot)."""
    clip_config = {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 4, "head_width": 32,
                       "mlp_ratio": 4.0},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    weakclip = replace(paper_weakclip_arch(), prompt_len=4, text_context_length=12, taps=(0, 1, 2, 3),
                       co_attention_width=32, co_attention_heads=2, co_attention_layers=1, neck_width=32,
                       head_width=32)
    return BenchSize(
        name="quick", clip_config=clip_config, weakclip=weakclip,
        weakclip_loss=WeakClipLossConfig(loss_size=16, crf_workers=0), input_size=64, batch_size=1, warmup_steps=1,
        timed_steps=2, mctformer=MCTformerArchConfig(image_size=64, patch_size=16, width=64, depth=3, heads=2),
        n_classes=5, inference_image=(48, 64),
        inference=InferenceAugmentation(scales=(0.75, 1.0), flip=True, crop=64, stride=43), inference_images=4,
        crf=CrfConfig(iterations=5), cam_image=(48, 64), cam_images=8)


def size_named(name: str) -> BenchSize:
    if name == "full":
        return full_size()
    if name == "quick":
        return quick_size()
    raise ValueError(f"bench size must be 'quick' or 'full', got {name!r}")


# --------------------------------------------------------------------------- memory and timing

def peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    """This process's resident set size now (``/proc/self/statm``; the peak where /proc is absent).

    The baseline of the training-memory growth: a high-water mark taken before training can sit above
    the training peak (model construction allocates transiently), which made the growth read 0.
    """
    statm = Path("/proc/self/statm")
    if not statm.is_file():
        return peak_rss_mib()
    resident_pages = int(statm.read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_baseline(device: torch.device) -> float:
    """Memory in use before the timed part (model built, nothing run yet)."""
    if device.type == "cuda":
        synchronise(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2 ** 20
    return current_rss_mib()


def memory_peak(device: torch.device) -> float:
    if device.type == "cuda":
        synchronise(device)
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peak_rss_mib()


def memory_kind(device: torch.device) -> str:
    return "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS (resource.ru_maxrss)"


@dataclass
class StepTimes:
    """Wall seconds and process CPU seconds (all threads) of each timed step.

    On a machine shared with other jobs wall time stretches with the load;
    CPU time much less so, which keeps ratios between models meaningful.
    """

    wall: list[float]
    cpu: list[float]


def time_steps(step, warmup_steps: int, timed_steps: int, device: torch.device) -> StepTimes:
    """Run ``step()`` warm-up times untimed, then ``timed_steps`` times, timing each."""
    for _ in range(warmup_steps):
        step()
    times = StepTimes(wall=[], cpu=[])
    for _ in range(timed_steps):
        synchronise(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        step()
        synchronise(device)
        times.wall.append(time.perf_counter() - started)
        times.cpu.append(time.process_time() - cpu_started)
    return times


def count(parameters) -> int:
    return sum(parameter.numel() for parameter in parameters)


# --------------------------------------------------------------------------- WeakCLIP training

def class_names(n_classes: int) -> list[str]:
    return ["background", *(f"class {index}" for index in range(1, n_classes))]


def forward_with_clip_gradients(model: WeakCLIP, images: torch.Tensor) -> WeakClipOutput:
    """``WeakCLIP.forward`` with gradients flowing into the visual encoder: the full fine-tuning baseline.

    WeakCLIP's own forward runs the frozen visual tower under ``no_grad``; the
    baseline needs the same graph with that removed. tests/test_bench.py checks
    this equals ``model(images)`` (to float rounding), so the two cannot drift apart.
    """
    return weakclip_heads(model, dense_visual_features(model.clip.visual, images, model.taps), model.text_embeddings())


def weakclip_heads(model: WeakCLIP, visual: DenseVisualFeatures, text_embeddings: torch.Tensor) -> WeakClipOutput:
    """The part of ``WeakCLIP.forward`` after its two encoders (co-attention, matching, pyramid adapter, decoder),
    the same operations in the same order, for the benchmarks that run the encoders themselves: with gradients
    (``forward_with_clip_gradients``) or timed part by part (bench/step_profile.py)."""
    batch, joint, grid_h, grid_w = visual.patch_embeddings.shape
    text = text_embeddings.unsqueeze(0).expand(batch, -1, -1)
    patches = visual.patch_embeddings.flatten(2).transpose(1, 2)
    if model.co_attention is not None:
        updated = model.co_attention(text, torch.cat([visual.global_embedding.unsqueeze(1), patches], dim=1))
        text, patches = updated.text, updated.visual[:, 1:]
    matching = cosine_matching(text, patches.transpose(1, 2).reshape(batch, joint, grid_h, grid_w))
    logits = model.decoder(model.pyramid_adapter(visual.taps), matching)
    return WeakClipOutput(logits=logits, matching=matching)


def training_batch(size: BenchSize, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random normalised images, their uint8 originals and seed masks (a quarter ignored), (B, ...)."""
    generator = torch.Generator().manual_seed(seed)
    side, batch = size.input_size, size.batch_size
    raw = torch.randint(0, 256, (batch, 3, side, side), generator=generator, dtype=torch.uint8)
    images = (raw.float() / 255.0 - 0.45) / 0.27
    seeds = torch.randint(0, size.n_classes, (batch, side, side), generator=generator)
    seeds[torch.rand((batch, side, side), generator=generator) < 0.25] = 255
    return {"image": images.to(device), "raw_image": raw.to(device), "seed_mask": seeds.to(device)}


def bench_trained_parameters(model: WeakCLIP, full_finetune: bool) -> list[torch.nn.Parameter]:
    """What a benchmarked WeakCLIP step trains: the method's trainable modules with CLIP frozen, or, for
    ``full_finetune`` (the cost the frozen CLIP saves), every parameter with CLIP unfrozen too."""
    if not full_finetune:
        return model.trainable_parameters()
    for parameter in model.clip.parameters():
        parameter.requires_grad_(True)
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def measure_weakclip_training(size: BenchSize, device: torch.device, full_finetune: bool) -> dict[str, Any]:
    """Images/s and peak memory of WeakCLIP's training step (forward, seed + CRF boundary + aux loss,
    backward, AdamW) with CLIP frozen (the method) or with CLIP trained too (``full_finetune``)."""
    torch.manual_seed(0)
    model = WeakCLIP(clip_from_config(size.clip_config), class_names(size.n_classes), size.weakclip).to(device)
    trained = bench_trained_parameters(model, full_finetune)
    optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=3e-5, fused=True)  # as weakclip_train's
    batch = training_batch(size, device)
    forward = (lambda images: forward_with_clip_gradients(model, images)) if full_finetune else model
    model.train()

    with CrfPool(size.weakclip_loss.crf, workers=0) as crf_pool:
        def step() -> None:
            output = forward(batch["image"])
            losses = weakclip_losses(output.logits, output.matching, batch["seed_mask"], batch["raw_image"],
                                     size.weakclip_loss, crf_pool)
            optimizer.zero_grad(set_to_none=True)
            losses.total.backward()
            optimizer.step()

        baseline = memory_baseline(device)
        times = time_steps(step, size.warmup_steps, size.timed_steps, device)
        peak = memory_peak(device)
    return training_record(times, size.batch_size, size.input_size, peak, baseline, device,
                           trainable=count(trained), total=count(model.parameters()))


def training_record(times: StepTimes, batch_size: int, input_size: int, peak: float, baseline: float,
                    device: torch.device, trainable: int, total: int) -> dict[str, Any]:
    median = float(np.median(times.wall))
    cpu_median = float(np.median(times.cpu))
    return {
        "images_per_s": batch_size / median,
        "s_per_step": median,
        "step_seconds": [round(s, 4) for s in times.wall],
        "cpu_s_per_step": cpu_median,
        "images_per_cpu_s": batch_size / cpu_median,
        "batch_size": batch_size,
        "input_size": input_size,
        "peak_memory_mib": peak,
        "train_memory_mib": max(peak - baseline, 0.0),
        "memory_kind": memory_kind(device),
        "trainable_parameters": trainable,
        "total_parameters": total,
    }


# --------------------------------------------------------------------------- MCTformer training

def measure_mctformer_training(size: BenchSize, device: torch.device) -> dict[str, Any]:
    """Images/s and peak memory of MCTformer-V2's training step (two multi-label soft-margin losses, AdamW)."""
    torch.manual_seed(0)
    n_foreground = size.n_classes - 1
    model = build_mctformer(size.mctformer, n_foreground).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4 * 64 / 512, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    side = size.mctformer.image_size
    images = torch.randn((size.batch_size, 3, side, side), generator=generator).to(device)
    labels = (torch.rand((size.batch_size, n_foreground), generator=generator) < 0.2).float()
    labels[:, 0] = 1.0
    labels = labels.to(device)
    model.train()

    def step() -> None:
        output = model(images)
        loss = (F.multilabel_soft_margin_loss(output.class_logits, labels)
                + F.multilabel_soft_margin_loss(output.patch_logits, labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    baseline = memory_baseline(device)
    times = time_steps(step, size.warmup_steps, size.timed_steps, device)
    peak = memory_peak(device)
    n_parameters = count(model.parameters())
    return training_record(times, size.batch_size, side, peak, baseline, device, n_parameters, n_parameters)


# --------------------------------------------------------------------------- inference, CRF, CAM store

def measure_pseudo_throughput(size: BenchSize, device: torch.device) -> dict[str, Any]:
    """Pseudo-mask inference images/s and dense CRF images/s with 1 and 2 workers, through the
    pseudo_masks stage's own benchmark (``bench.pseudo_bench.bench_dense_model``) on a random-init WeakCLIP
    and random images (throughput does not depend on the weights or the pixels).

    Inference: multi-scale + flip, sliding window, label-restricted softmax; CRF: the stage's pseudo-mask
    settings on background + the image's labels, workers started before the clock runs.
    """
    from bench.pseudo_bench import bench_dense_model

    torch.manual_seed(0)
    model = WeakCLIP(clip_from_config(size.clip_config), class_names(size.n_classes), size.weakclip).to(device)
    model.eval()
    height, width = size.inference_image
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(size.inference_images)]
    labels = [[1, 2] for _ in images]
    call_started = time.perf_counter()
    measured = bench_dense_model(lambda batch: model(batch).logits, images, labels, size.n_classes, size.inference,
                                 size.crf, batch_size=1, device=device, worker_counts=(1, 2))
    call_seconds = time.perf_counter() - call_started
    common = {"n_images": len(images), "image_size": [height, width]}
    inference_rate = float(measured["inference_images_per_s"])
    source = "bench_dense_model (timed images, warm-up excluded)"
    if inference_rate < 0.1:
        # bench_dense_model rounds its rates to 2 decimals: below 0.1 images/s that loses the number. The
        # whole call runs 1 warm-up + n timed inference passes and the CRF, so (n + 1) / call time is a
        # lower bound of the inference rate (CRF seconds are small next to full-size CPU inference).
        inference_rate = (len(images) + 1) / call_seconds
        source = ("lower bound: (n + 1) inference passes / the whole bench_dense_model call incl. CRF "
                  f"(its own rate, rounded to 2 decimals, read {measured['inference_images_per_s']})")
    inference = {"images_per_s": inference_rate, "s_per_image": 1.0 / inference_rate, "rate_source": source,
                 "bench_dense_model_wall_s": call_seconds, "scales": measured["scales"], "flip": measured["flip"],
                 "crop": measured["crop"], "stride": measured["stride"], **common}
    crf: dict[str, Any] = {}
    for workers in (1, 2):
        rate = float(measured["crf_images_per_s"][str(workers)])
        crf[f"workers_{workers}"] = {"images_per_s": rate, "s_per_image": 1.0 / rate if rate > 0 else None,
                                     "workers": workers, "n_classes": 1 + len(labels[0]),
                                     "iterations": size.crf.iterations, **common}
    crf["speedup_2_vs_1"] = crf["workers_2"]["images_per_s"] / crf["workers_1"]["images_per_s"]
    return {"pseudo_inference": inference, "crf": crf}


COCO_CLASS_COUNT = 81
CAM_INFERENCE_BATCH = 4  # images per multiscale_cams call (the presets batch 16: 4 keeps the CPU run short)
CAM_INFERENCE_LABELS = 3  # classes per image (COCO's mean is 2.9, VOC's 1.5)


def measure_cam_inference(size: BenchSize, device: torch.device, n_classes: int) -> dict[str, Any]:
    """Seconds per image and peak memory of ``cam_infer``'s forward (``multiscale_cams``) on random-init
    MCTformer-V2 (``size.mctformer``) with ``n_classes`` classes (background included): a batch of
    ``CAM_INFERENCE_BATCH`` images of ``size.cam_image`` at the presets' settings (scale 1.0, flip, the last 3
    layers' attention), each image labelled with ``CAM_INFERENCE_LABELS`` classes; one warm-up call, then one
    timed; the memory growth is over both calls, from after the model is built."""
    from weakclip_core.method.cam import multiscale_cams

    torch.manual_seed(0)
    model = build_mctformer(size.mctformer, n_classes - 1).to(device).eval()
    height, width = size.cam_image
    images = torch.randn(CAM_INFERENCE_BATCH, 3, height, width, device=device)
    labels = [[1 + (index + offset) % (n_classes - 1) for offset in range(CAM_INFERENCE_LABELS)]
              for index in range(CAM_INFERENCE_BATCH)]
    layers = min(3, size.mctformer.depth)
    baseline = memory_baseline(device)  # before the warm-up: a CPU process's peak RSS is kept for its lifetime
    multiscale_cams(model, images, labels, [1.0], True, layers)
    synchronise(device)
    started = time.perf_counter()
    multiscale_cams(model, images, labels, [1.0], True, layers)
    synchronise(device)
    seconds = time.perf_counter() - started
    peak = memory_peak(device)
    return {"n_classes": n_classes, "n_images": CAM_INFERENCE_BATCH, "image_size": [height, width],
            "labels_per_image": CAM_INFERENCE_LABELS, "s_per_image": seconds / CAM_INFERENCE_BATCH,
            "peak_memory_mib": peak, "growth_memory_mib": max(peak - baseline, 0.0),
            "memory_kind": memory_kind(device)}


def smooth_cams(rng: np.random.Generator, n_present: int, height: int, width: int) -> np.ndarray:
    """(n_present, H, W) float32 in [0, 1]: a Gaussian blob per class, like a real CAM's smooth peak."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    cams = []
    for _ in range(n_present):
        centre_row, centre_col = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        spread = rng.uniform(0.1, 0.25) * min(height, width)
        blob = np.exp(-((rows - centre_row) ** 2 + (cols - centre_col) ** 2) / (2 * spread ** 2))
        cams.append(blob / blob.max())
    return np.stack(cams).astype(np.float32)


def measure_cam_store(size: BenchSize, n_classes: int | None = None) -> dict[str, Any]:
    """Bytes per image of the CAM store (float16, gzip + shuffle) vs the same CAMs as raw float32."""
    n_classes = n_classes or size.n_classes
    rng = np.random.default_rng(0)
    height, width = size.cam_image
    raw_bytes = 0
    with tempfile.TemporaryDirectory(prefix="bench-cams-") as folder:
        path = Path(folder) / "cams.h5"
        with CamStoreWriter(path, "bench", class_names(n_classes), {"bench": size.name}) as writer:
            for index in range(size.cam_images):
                cams = smooth_cams(rng, size.cam_present, height, width)
                writer.add(f"image_{index:05d}", list(range(1, size.cam_present + 1)), cams)
                raw_bytes += cams.astype(np.float32).nbytes
        store_bytes = path.stat().st_size
    return {"bytes_per_image": store_bytes / size.cam_images,
            "raw_float32_bytes_per_image": raw_bytes / size.cam_images,
            "compression_ratio": raw_bytes / store_bytes, "n_images": size.cam_images,
            "image_size": [height, width], "classes_per_image": size.cam_present,
            "source": "synthetic smooth CAMs (one Gaussian blob per present class)"}


def measure_existing_cam_store(path: Path) -> dict[str, Any] | None:
    """The same ratio for a CAM store the chain wrote (``artifacts/cams/train.h5``), when there is one."""
    if not path.is_file():
        return None
    import h5py
    raw_bytes, n_images = 0, 0
    with h5py.File(path, "r") as handle:
        for image_id in handle:
            shape = handle[image_id]["cams"].shape
            raw_bytes += int(np.prod(shape)) * 4
            n_images += 1
    if n_images == 0 or raw_bytes == 0:
        return None
    store_bytes = path.stat().st_size
    return {"bytes_per_image": store_bytes / n_images, "raw_float32_bytes_per_image": raw_bytes / n_images,
            "compression_ratio": raw_bytes / store_bytes, "n_images": n_images,
            "source": f"{path.parent.name}/{path.name}"}


def paper_parameter_counts(n_classes: int = VOC_CLASS_COUNT) -> dict[str, Any]:
    """Trainable / total parameters of the paper-size WeakCLIP (ViT-B/16 at 512), built on the meta device."""
    with torch.device("meta"):
        clip_model = clip_from_config(named_model_config("ViT-B-16", image_size=512))
        model = WeakCLIP(clip_model, class_names(n_classes), paper_weakclip_arch())
    trainable, total = count(model.trainable_parameters()), count(model.parameters())
    return {"n_classes": n_classes, "trainable": trainable, "total": total, "trainable_fraction": trainable / total}


def environment(device: torch.device) -> dict[str, Any]:
    record: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                              "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record

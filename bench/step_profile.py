"""Where a WeakCLIP training step's time goes (issue #21): one step split into its parts, frozen and unfrozen.

The frozen-CLIP step is only ~1.8x faster than full fine-tuning on CPU (docs/BENCHMARKS.md), far from what
freezing 87.6 % of the parameters suggests. This module times the parts of one step, so the ratio can be
read against what it could be:

``clip_forward``
    the CLIP visual encoder's dense forward (``dense_visual_features``): under ``no_grad`` when CLIP is frozen
    (as ``WeakCLIP.forward`` runs it), recording the autograd graph when it is trained too;
``text_forward``
    the learned prompts through the CLIP text encoder (graph kept in both modes: the prompts train);
``heads_forward``
    co-attention, cosine matching, pyramid adapter and decoder: the trainable parts;
``crf_target``
    the boundary loss's dense-CRF target Q (``crf_targets``, in ``weakclip.loss.crf_workers`` processes);
    0 when ``boundary_weight`` is 0 (the synthetic default);
``losses``
    the loss arithmetic around it (resizes, seeding, boundary KL, auxiliary);
``backward``
    ``total.backward()``;
``optimizer``
    ``zero_grad`` and AdamW's ``step``;
``other``
    the step's wall time minus the parts: Python between them, nothing else.

The step is ``WeakCLIP.forward`` + ``weakclip_losses`` + the training loop's ``zero_grad → backward → step``
re-enacted part by part in the same order (the same random draws: drop path, dropout);
tests/test_step_profile.py checks it gives the same losses and gradients as those functions.

The limit of the frozen / full ratio (``ratio_limit``). The *ideal frozen step* is the frozen step's
compulsory work: ``clip_forward + text_forward + heads_forward + backward + optimizer`` measured in the
frozen step. It is what no frozen step can avoid: the encoder's forward (without a graph), the trainable
parts' forward, their backward (through the text encoder to the prompts) and their update. It leaves out what
a frozen step need not spend on the critical path: the CRF target (CPU work that workers can take over),
the loss arithmetic and ``other``. Then

    limit = full_step / ideal_frozen_step,   measured_ratio = full_step / frozen_step,
    fraction = measured_ratio / limit = ideal_frozen_step / frozen_step,

both steps measured in the same run at the same size and precision. ``fraction`` is the share of the frozen
step that is compulsory work (1.0: no overhead left to cut).

Timing: ``torch.cuda.synchronize`` around every part on CUDA; on CPU ``time.perf_counter`` around each part.
One or more warm-up steps, then the parts of the *median step* (the timed step whose wall time is the median),
so the parts add up exactly to the step's wall time with ``other``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.measure import (BenchSize, bench_trained_parameters, class_names, full_size, quick_size, synchronise,
                           training_batch, weakclip_heads)
from weakclip_core.config import Params
from weakclip_core.config.params import load_params
from weakclip_core.method.crf import CrfPool
from weakclip_core.method.losses import (WeakClipLosses, auxiliary_loss, boundary_loss, crf_targets, resize_logits,
                                         resize_seeds, seeding_loss)
from weakclip_core.models.clip import arch_model_config, clip_from_config, dense_visual_features
from weakclip_core.models.weakclip import WeakCLIP
from weakclip_core.runtime.device import autocast

PARTS = ("clip_forward", "text_forward", "heads_forward", "crf_target", "losses", "backward", "optimizer")
COMPULSORY = ("clip_forward", "text_forward", "heads_forward", "backward", "optimizer")
"""The parts of the ideal frozen step (module docstring)."""
STAGE_ADAMW = {"fused": True}
"""AdamW's implementation as ``pipeline/weakclip_train.py`` builds it (``{"foreach": False}``: the per-tensor loop,
torch's default on CPU before it)."""


@dataclass(frozen=True)
class ProfileSize:
    """A model, batch and loss to profile: a ``bench.measure.BenchSize`` plus the training settings the step
    depends on (drop path on the frozen encoder, the CRF's worker processes)."""

    label: str
    bench: BenchSize
    clip_drop_path_rate: float = 0.0
    crf_workers: int = 0
    clip_drop_path_unit: str = "image"


def paper_profile_size(timed_steps: int = 3) -> ProfileSize:
    """ViT-B/16 at 512, batch 2, the paper's widths, K = 21, boundary loss on (``make bench``'s full size), the frozen
    encoder's stochastic depth as the VOC preset draws it (0.1, per token position)."""
    bench = replace(full_size(), warmup_steps=1, timed_steps=timed_steps)
    return ProfileSize("paper (ViT-B/16 @ 512, batch 2)", bench, clip_drop_path_rate=0.1,
                       crf_workers=bench.weakclip_loss.crf_workers, clip_drop_path_unit="token")


def synthetic_profile_size(params: Params, timed_steps: int = 5) -> ProfileSize:
    """``params.yaml``'s sizes: its CLIP architecture, WeakCLIP widths, loss, crop and batch, K = classes + 1."""
    weakclip, train = params.weakclip, params.weakclip.train
    clip_config = arch_model_config(params.clip.arch)  # the positional embedding is interpolated to the crop
    bench = replace(quick_size(), name="synthetic", clip_config=clip_config, weakclip=weakclip.arch(),
                    weakclip_loss=weakclip.loss, input_size=train.crop, batch_size=train.batch_size,
                    n_classes=params.dataset.synthetic.n_classes + 1, warmup_steps=1, timed_steps=timed_steps)
    return ProfileSize(f"synthetic default (params.yaml: crop {train.crop}, batch {train.batch_size})", bench,
                       clip_drop_path_rate=train.clip_drop_path_rate,
                       crf_workers=weakclip.loss.crf_workers if weakclip.loss.boundary_weight > 0 else 0,
                       clip_drop_path_unit=train.clip_drop_path_unit)


def quick_profile_size() -> ProfileSize:
    """``bench.run --quick``'s tiny model: the same code paths in a second."""
    return ProfileSize("quick (tiny model)", quick_size())


# --------------------------------------------------------------------------- one step, part by part

class PartClock:
    """Wall seconds and process CPU seconds (all threads) per part of one step; ``synchronise`` before and
    after each part on CUDA. CPU time is kept beside wall time because a machine shared with other jobs
    stretches wall time with its load (docs/BENCHMARKS.md), CPU time much less."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = {part: 0.0 for part in PARTS}
        self.cpu_seconds = {part: 0.0 for part in PARTS}

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        synchronise(self.device)
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            synchronise(self.device)
            self.seconds[name] += time.perf_counter() - started
            self.cpu_seconds[name] += time.process_time() - cpu_started


def profiled_step(model: WeakCLIP, optimizer: torch.optim.Optimizer, batch: Mapping[str, torch.Tensor],
                  size: BenchSize, crf_pool: CrfPool, full_finetune: bool, clock: PartClock,
                  precision: str = "fp32") -> WeakClipLosses:
    """One training step, each part timed by ``clock``: ``WeakCLIP.forward`` (the visual encoder with
    gradients when ``full_finetune``), ``weakclip_losses`` and the loop's ``zero_grad → backward → step``.

    Under ``precision: bf16`` the forward and the losses run under autocast (each part in its own context, as
    the training loop's one context around them would run them); backward and the step outside it.
    """
    images, device = batch["image"], batch["image"].device
    cfg = size.weakclip_loss
    with clock.part("clip_forward"), autocast(device, precision):
        with contextlib.nullcontext() if full_finetune else torch.no_grad():
            visual = dense_visual_features(model.clip.visual, images, model.taps)
    with clock.part("text_forward"), autocast(device, precision):
        text_embeddings = model.text_embeddings()
    with clock.part("heads_forward"), autocast(device, precision):
        output = weakclip_heads(model, visual, text_embeddings)
        logits, matching = output.logits, output.matching
    with clock.part("losses"), autocast(device, precision):
        small_logits = resize_logits(logits.float(), cfg.loss_size)
        small_seeds = resize_seeds(batch["seed_mask"], (cfg.loss_size, cfg.loss_size))
        seed = seeding_loss(small_logits, small_seeds, cfg.seed_loss_reduction)
    if cfg.boundary_weight > 0:
        with clock.part("crf_target"), autocast(device, precision):
            target = crf_targets(small_logits, batch["raw_image"], crf_pool)
        with clock.part("losses"), autocast(device, precision):
            boundary = boundary_loss(small_logits, target, cfg.ratio_min, cfg.ratio_max)
    else:
        with clock.part("losses"), autocast(device, precision):
            boundary = small_logits.sum() * 0.0
    with clock.part("losses"), autocast(device, precision):
        aux = auxiliary_loss(matching.float(), batch["seed_mask"], cfg.aux_temperature, cfg.aux_form)
        total = seed + cfg.boundary_weight * boundary + cfg.aux_weight * aux
    with clock.part("optimizer"):
        optimizer.zero_grad(set_to_none=True)
    with clock.part("backward"):
        total.backward()
    with clock.part("optimizer"):
        optimizer.step()
    return WeakClipLosses(total=total, seed=seed, boundary=boundary, aux=aux)


def build_step(size: ProfileSize, device: torch.device, full_finetune: bool,
               optimizer_options: Mapping[str, Any] | None = None) -> tuple[WeakCLIP, torch.optim.Optimizer]:
    """The model (seed 0, train mode) and AdamW over what trains: the learned parts, or everything; AdamW as
    the stage builds it unless ``optimizer_options`` says otherwise."""
    bench = size.bench
    torch.manual_seed(0)
    model = WeakCLIP(clip_from_config(bench.clip_config), class_names(bench.n_classes), bench.weakclip,
                     clip_drop_path_rate=size.clip_drop_path_rate,
                     clip_drop_path_unit=size.clip_drop_path_unit).to(device)
    trained = bench_trained_parameters(model, full_finetune)
    options = STAGE_ADAMW if optimizer_options is None else optimizer_options
    optimizer = torch.optim.AdamW(trained, lr=1e-4, weight_decay=3e-5, **options)
    model.train()
    return model, optimizer


def median_step(step_parts: list[dict[str, float]], step_totals: list[float]) -> tuple[dict[str, float], float]:
    """The parts and wall time of the timed step whose wall time is the median (the lower middle of an even
    count), with ``other`` = its wall time minus its parts."""
    index = int(np.argsort(step_totals)[(len(step_totals) - 1) // 2])
    parts = dict(step_parts[index])
    parts["other"] = step_totals[index] - sum(parts.values())
    return parts, step_totals[index]


def profile_training_step(size: ProfileSize, device: torch.device, full_finetune: bool, precision: str = "fp32",
                          optimizer_options: Mapping[str, Any] | None = None,
                          crf_workers: int | None = None) -> dict[str, Any]:
    """Warm-up steps, then ``timed_steps`` steps timed part by part; the median step's parts (seconds).

    ``optimizer_options`` go to AdamW (default ``STAGE_ADAMW``); ``crf_workers``
    overrides the size's CRF processes (0: inline), for before / after comparisons.
    """
    bench = size.bench
    model, optimizer = build_step(size, device, full_finetune, optimizer_options)
    batch = training_batch(bench, device)
    workers = size.crf_workers if crf_workers is None else crf_workers
    totals: list[float] = []
    cpu_totals: list[float] = []
    parts: list[dict[str, float]] = []
    cpu_parts: list[dict[str, float]] = []
    losses: list[float] = []
    with CrfPool(bench.weakclip_loss.crf, workers=workers) as crf_pool:
        for index in range(bench.warmup_steps + bench.timed_steps):
            clock = PartClock(device)
            synchronise(device)
            started, cpu_started = time.perf_counter(), time.process_time()
            step_losses = profiled_step(model, optimizer, batch, bench, crf_pool, full_finetune, clock, precision)
            synchronise(device)
            if index >= bench.warmup_steps:
                totals.append(time.perf_counter() - started)
                cpu_totals.append(time.process_time() - cpu_started)
                parts.append(clock.seconds)
                cpu_parts.append(clock.cpu_seconds)
                losses.append(float(step_losses.total.detach()))
    median_parts, step_s = median_step(parts, totals)
    median_cpu_parts, cpu_step_s = median_step(cpu_parts, cpu_totals)
    return {"step_s": step_s, "parts_s": median_parts, "step_seconds": [round(s, 4) for s in totals],
            "cpu_step_s": cpu_step_s, "cpu_parts_s": median_cpu_parts,
            "losses": losses, "full_finetune": full_finetune, "precision": precision,
            "crf_workers": workers, "optimizer_options": dict(STAGE_ADAMW if optimizer_options is None
                                                              else optimizer_options),
            "input_size": bench.input_size, "batch_size": bench.batch_size, "n_classes": bench.n_classes,
            "timed_steps": bench.timed_steps}


# --------------------------------------------------------------------------- the ratio's limit

def ideal_frozen_step(frozen_parts: Mapping[str, float]) -> float:
    """The frozen step's compulsory work: the sum of its ``COMPULSORY`` parts (module docstring)."""
    return sum(frozen_parts[part] for part in COMPULSORY)


def ratio_limit(frozen_parts: Mapping[str, float], full_step_s: float) -> float:
    """``full_step / ideal_frozen_step``: the frozen / full speed ratio a frozen step without overhead reaches."""
    ideal = ideal_frozen_step(frozen_parts)
    if not ideal > 0:
        raise ValueError(f"the ideal frozen step must be positive, got {ideal} from {dict(frozen_parts)}")
    return full_step_s / ideal


def ratio_summary(frozen: Mapping[str, Any], full: Mapping[str, Any], clock: str = "") -> dict[str, float]:
    """Measured ratio, limit and their fraction from two ``profile_training_step`` records, in wall seconds
    (``clock=""``) or CPU seconds (``clock="cpu_"``: the records' ``cpu_step_s`` and ``cpu_parts_s``)."""
    frozen_step, full_step = frozen[f"{clock}step_s"], full[f"{clock}step_s"]
    measured = full_step / frozen_step
    limit = ratio_limit(frozen[f"{clock}parts_s"], full_step)
    return {"measured_ratio": measured, "limit": limit, "fraction_of_limit": measured / limit,
            "ideal_frozen_step_s": ideal_frozen_step(frozen[f"{clock}parts_s"]), "frozen_step_s": frozen_step,
            "full_step_s": full_step}


def profile_size(size: ProfileSize, device: torch.device, precisions: tuple[str, ...] = ("fp32", "bf16"),
                 progress=print) -> dict[str, Any]:
    """Frozen and full fine-tuning at each precision, with their ratio summaries."""
    runs: dict[str, dict[str, Any]] = {}
    summaries: dict[str, dict[str, float]] = {}
    for precision in precisions:
        for mode, full_finetune in (("frozen", False), ("full", True)):
            progress(f"step_profile: {size.label}, CLIP {mode}, {precision} ...")
            runs[f"{mode}_{precision}"] = profile_training_step(size, device, full_finetune, precision)
        summaries[precision] = ratio_summary(runs[f"frozen_{precision}"], runs[f"full_{precision}"])
        summaries[f"{precision}_cpu"] = ratio_summary(runs[f"frozen_{precision}"], runs[f"full_{precision}"], "cpu_")
    return {"label": size.label, "runs": runs, "ratios": summaries}


PER_TENSOR_ADAMW = {"foreach": False}
"""AdamW's per-tensor loop: torch's default on CPU, what the stage ran before ``STAGE_ADAMW``."""


def optimizer_step_seconds(size: ProfileSize, device: torch.device, full_finetune: bool,
                           optimizer_options: Mapping[str, Any], steps: int = 3) -> dict[str, float]:
    """AdamW's ``zero_grad`` + ``step`` alone (random gradients, one untimed step first): the median wall and
    CPU seconds over ``steps``. The before / after of the fused-AdamW cut without the rest of the step."""
    model, optimizer = build_step(size, device, full_finetune, optimizer_options)
    generator = torch.Generator().manual_seed(0)
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    for parameter in parameters:
        parameter.grad = (torch.randn(parameter.shape, generator=generator) * 1e-3).to(device)
    optimizer.step()
    wall, cpu = [], []
    for _ in range(steps):
        synchronise(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients (zeros): the step's work is the same
        optimizer.step()
        synchronise(device)
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    del model
    return {"s": float(np.median(wall)), "cpu_s": float(np.median(cpu))}


def optimizer_cut(size: ProfileSize, device: torch.device) -> dict[str, dict[str, dict[str, float]]]:
    """The per-tensor loop vs ``STAGE_ADAMW`` for the frozen step's parameters and for all of them."""
    return {mode: {"per_tensor": optimizer_step_seconds(size, device, full_finetune, PER_TENSOR_ADAMW),
                   "fused": optimizer_step_seconds(size, device, full_finetune, STAGE_ADAMW)}
            for mode, full_finetune in (("frozen", False), ("full", True))}


CPU_THREADS = 1
"""torch threads of the profile on CPU. Two OpenMP threads on a machine shared with other jobs spin while their
partner is descheduled, which inflates a part's wall *and* CPU time: two runs at load 3-4 on this project's
2-core machine read the synthetic frozen backward as 0.15 s and 1.58 s. One thread measures the work itself."""


def profile_sizes(size_name: str, device: torch.device, params_path: Path, progress=print) -> dict[str, Any]:
    """``bench.run``'s step profile: ``full`` profiles the paper size and ``params.yaml``'s synthetic default,
    ``quick`` the tiny model; each frozen and unfrozen, fp32 and bf16. On CPU with ``CPU_THREADS`` threads."""
    if device.type == "cpu":
        torch.set_num_threads(CPU_THREADS)
    if size_name == "quick":
        sizes = {"quick": quick_profile_size()}
    elif size_name == "full":
        sizes = {"paper": paper_profile_size(), "synthetic": synthetic_profile_size(load_params(params_path))}
    else:
        raise ValueError(f"step profile size must be 'quick' or 'full', got {size_name!r}")
    records = {}
    for name, size in sizes.items():
        records[name] = profile_size(size, device, progress=progress)
        progress(f"step_profile: {size.label}, AdamW per-tensor loop vs fused ...")
        records[name]["optimizer_cut"] = optimizer_cut(size, device)
    return records

"""``python -m bench.run [--quick]``: the benchmark suite → ``bench/results.json`` + ``docs/BENCHMARKS.md``.

Measured side by side in one run on one machine (CPU here; the same command
on a GPU machine measures CUDA time and ``torch.cuda.max_memory_allocated``):

- WeakCLIP training images/s and peak memory (CLIP frozen: the method) vs the
  same model with CLIP trained too (full fine-tuning) vs MCTformer-V2 (DeiT-S
  224): the paper's parameter-efficiency claim, as ratios;
- trainable / total parameters (measured models, and the paper-size model);
- pseudo-mask inference images/s (multi-scale + flip, sliding window);
- dense CRF images/s with 1 and 2 worker processes;
- CAM store bytes per image vs raw float32;
- per-stage wall time of ``make repro``;
- one WeakCLIP training step split by part (``bench.step_profile``), CLIP frozen and unfrozen, fp32 and
  bf16, at the paper size and at ``params.yaml``'s synthetic default, with the frozen / full ratio's limit.

Each training measurement runs in its own child process (``--child``), so its
peak memory is its own. ``--quick`` runs tiny models in well under a minute
(tests/test_bench.py runs it); the default runs the paper's sizes.

Stage wall times come from the stages themselves: each run of a stage records
its wall time in ``timings/<stage>.json`` (git-ignored, not a DVC output).
For a stage without one, the full run times ``dvc repro -s <stage> --force``
(which also writes the stage's record); ``--quick`` and ``--no-stage-timing``
fall back to the last full-chain ``make repro`` record of ``params.yaml``'s dataset
(``timings/repro_<dataset>.json``; for the synthetic default, else the committed ``bench/repro_timing.json``).
The page says which source each number came from.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.repro_timing import PUBLISHED_DATASET, machine_description, record_file, stand_in_record
from weakclip_core.artifacts.atomic import atomic_path, write_json
from weakclip_core.config import load_params

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = Path(__file__).resolve().parent / "BENCHMARKS.template.md"
TIMINGS_DIR = REPO / "timings"  # each stage's timings/<stage>.json (pipeline/_stage.py), git-ignored
PUBLISHED_REPRO_RECORD = REPO / "bench" / "repro_timing.json"  # `make timing-table`'s: the synthetic default's
RESULT_MARKER = "BENCH_RESULT "
CHILDREN = ("weakclip", "weakclip_full_finetune", "mctformer", "inference_crf_store", "cam_inference_voc",
            "cam_inference_coco", "step_profile")

# The paper's training-cost claim (docs/METHOD.md §2): WeakCLIP vs the MCTformer refinement step (PSA on ResNet38).
PAPER_CLAIM = {"weakclip_fps": 16.8, "weakclip_gib": 9.7, "mctformer_refinement_fps": 3.9,
               "mctformer_refinement_gib": 30.7, "speedup": 4.3, "memory_saving": 0.684}


# --------------------------------------------------------------------------- child processes

def run_child(name: str, size: str, device: str) -> dict[str, Any]:
    """``measure_<name>`` in a fresh interpreter; returns its JSON result (stderr is shown on failure)."""
    command = [sys.executable, "-m", "bench.run", "--child", name, "--size", size, "--device", device]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=environment)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    raise RuntimeError(f"bench child {name!r} failed (rc {completed.returncode}):\n{completed.stderr[-3000:]}")


def child_main(name: str, size_name: str, device_name: str) -> None:
    """Entry point of one child: run one measurement, print it as one marked JSON line."""
    from bench import measure
    from weakclip_core.runtime.device import resolve_device

    device = resolve_device(device_name)
    size = measure.size_named(size_name)
    if name == "weakclip":
        result = measure.measure_weakclip_training(size, device, full_finetune=False)
    elif name == "weakclip_full_finetune":
        result = measure.measure_weakclip_training(size, device, full_finetune=True)
    elif name == "mctformer":
        result = measure.measure_mctformer_training(size, device)
    elif name == "inference_crf_store":  # no peak memory reported: these share one process
        result = {
            **measure.measure_pseudo_throughput(size, device),
            "cam_store": {"synthetic": measure.measure_cam_store(size),
                          "project": measure.measure_existing_cam_store(REPO / "artifacts" / "cams" / "train.h5")},
            "paper_size_parameters": measure.paper_parameter_counts(),
        }
    elif name == "cam_inference_voc":  # one process per class count: each peak memory is its own
        result = measure.measure_cam_inference(size, device, measure.VOC_CLASS_COUNT)
    elif name == "cam_inference_coco":
        result = measure.measure_cam_inference(size, device, measure.COCO_CLASS_COUNT)
    elif name == "step_profile":
        from bench.step_profile import profile_sizes

        result = {"sizes": profile_sizes(size_name, device, REPO / "params.yaml",
                                         progress=lambda line: print(line, file=sys.stderr, flush=True))}
    else:
        raise ValueError(f"unknown bench child {name!r} (one of {', '.join(CHILDREN)})")
    result["environment"] = measure.environment(device)
    print(RESULT_MARKER + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- stage timings

def stage_names(root: Path) -> list[str]:
    """DVC's stages in dvc.yaml order (``foreach`` expanded: ``seg_train@gt``)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return [stage.addressing for stage in repo.index.stages]


def own_timing(timings_dir: Path, stage: str) -> tuple[float, str] | None:
    """The stage's own record of its last run (``timings/<stage>.json``: ``wall_s``, ``finished_at``)."""
    path = timings_dir / f"{stage}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    value = data.get("wall_s") if isinstance(data, dict) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        return None
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return float(value), f"{shown}, finished {data.get('finished_at', 'undated')}"


def time_stage_with_dvc(root: Path, stage: str) -> float:
    """Seconds of ``dvc repro -s <stage> --force`` (the stage alone, its deps as they are)."""
    environment = {**os.environ, "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1",
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    started = time.perf_counter()
    completed = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro", "-s", "--force", stage], cwd=root,
                               env=environment, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"dvc repro -s --force {stage} failed:\n{completed.stderr[-2000:]}")
    return time.perf_counter() - started


def repro_records(dataset_name: str, timings_dir: Path = TIMINGS_DIR) -> tuple[Path, ...]:
    """The full-chain ``make repro`` records that may stand in for a stage's own time, in order of preference:
    this machine's last run on ``dataset_name`` (``timings/repro_<dataset>.json``, bench/repro_timing.py), then,
    for the synthetic default only, the published one. A VOC or COCO run never borrows the synthetic CPU times."""
    published = (PUBLISHED_REPRO_RECORD,) if dataset_name == PUBLISHED_DATASET else ()
    return (record_file(timings_dir, dataset_name), *published)


def collect_stage_timings(root: Path, measure_missing: bool, timings_dir: Path,
                          repro_records: tuple[Path, ...]) -> dict[str, Any]:
    """``{"seconds": {stage: s}, "sources": {stage: where it came from}, "missing": [...]}``.

    Order of preference: the stage's own ``timings/<stage>.json``; in the full run, a fresh
    ``dvc repro -s --force`` of the stage (its own record when it writes one, else the command's time);
    otherwise the first of ``repro_records`` (the last full-chain ``make repro``) that holds the stage; in the
    published file, the record of this machine's CPU kind, else the newest (``stand_in_record``).
    """
    repro: dict[str, Any] = {}
    repro_path: Path | None = None
    machine = machine_description()
    for path in repro_records:
        record = stand_in_record(path, machine)
        if record is not None:
            repro, repro_path = record, path
            break
    seconds: dict[str, float] = {}
    sources: dict[str, str] = {}
    missing: list[str] = []
    for stage in stage_names(root):
        own = own_timing(timings_dir, stage)
        if own is None and measure_missing:
            measured = time_stage_with_dvc(root, stage)
            own = own_timing(timings_dir, stage) or (measured, "dvc repro -s --force (this run)")
        if own is not None:
            seconds[stage], sources[stage] = own
        elif stage in repro.get("stages", {}):
            assert repro_path is not None
            shown = repro_path.relative_to(REPO) if repro_path.is_relative_to(REPO) else repro_path
            seconds[stage] = float(repro["stages"][stage])
            sources[stage] = (f"make repro ({shown}, {repro.get('measured_on', 'undated')}"
                              + (f", {repro['machine']})" if repro.get("machine") else ")"))
        else:
            missing.append(stage)
    return {"seconds": seconds, "sources": sources, "missing": missing, "total_s": sum(seconds.values())}


# --------------------------------------------------------------------------- the report page

def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def ratios(training: dict[str, dict[str, Any]]) -> dict[str, float]:
    """WeakCLIP (CLIP frozen) against the two baselines: speed (>1 = faster) and memory (<1 = less)."""
    weakclip, finetune, mct = training["weakclip"], training["weakclip_full_finetune"], training["mctformer"]
    return {
        "speed_vs_full_finetune": weakclip["images_per_s"] / finetune["images_per_s"],
        "cpu_speed_vs_full_finetune": weakclip["images_per_cpu_s"] / finetune["images_per_cpu_s"],
        "peak_memory_vs_full_finetune": weakclip["peak_memory_mib"] / finetune["peak_memory_mib"],
        "train_memory_vs_full_finetune": weakclip["train_memory_mib"] / finetune["train_memory_mib"],
        "trainable_parameters_vs_full_finetune": weakclip["trainable_parameters"] / finetune["trainable_parameters"],
        "speed_vs_mctformer": weakclip["images_per_s"] / mct["images_per_s"],
        "cpu_speed_vs_mctformer": weakclip["images_per_cpu_s"] / mct["images_per_cpu_s"],
        "peak_memory_vs_mctformer": weakclip["peak_memory_mib"] / mct["peak_memory_mib"],
    }


def _row(*cells: Any) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


GPU_SPEED_FILES = sorted((Path(__file__).resolve().parent / "gpu").glob("gpu_check_speed_*.json"))
"""Full-size WeakCLIP step speed measured by ``bench/gpu_check.sh`` on lent GPUs (one file per card)."""


def gpu_section(speed_files: list[Path]) -> str:
    """A table of the ``bench/gpu_check.sh`` speed records, or a line saying none was measured."""
    if not speed_files:
        return "No GPU record yet: run `bash bench/gpu_check.sh` on a GPU machine (it writes `bench/gpu/`)."
    rows = [_row("card", "input", "K", "batch", "precision", "s/step", "images/s", "peak CUDA memory (GiB)",
                 "trainable / total params", "record"), _row(*["---"] * 10)]
    for path in speed_files:
        record = json.loads(path.read_text(encoding="utf-8"))
        rows.append(_row(record.get("device_name", record["device"]), record["input_size"], record["n_classes"],
                         record["batch_size"], "fp32" if not record["amp"] else "AMP",
                         _number(record["s_per_step"], 3), _number(record["images_per_s"], 1),
                         _number(record["peak_max_memory_allocated_gib"], 2),
                         f"{record['trainable_parameters'] / 1e6:.2f}M / {record['total_parameters'] / 1e6:.2f}M",
                         f"`bench/gpu/{path.name}`"))
    return "\n".join(rows)


STEP_PARTS = (("clip_forward", "CLIP forward"), ("text_forward", "text forward"), ("heads_forward", "heads forward"),
              ("crf_target", "CRF target"), ("losses", "losses"), ("backward", "backward"),
              ("optimizer", "optimizer"), ("other", "other"))
"""``bench.step_profile``'s parts, in step order, with their column names."""


def step_profile_fields(profile: dict[str, Any] | None) -> dict[str, str]:
    """The step profile's three tables (parts, the ratio's limit, fp32 vs bf16); a results file written
    before the profile existed renders a line saying so (``--render-only`` of an old file)."""
    if not profile:
        missing = "Not in this results file: run `python -m bench.run` (or `--step-profile-only`)."
        return {"step_profile_table": missing, "step_limit_table": missing, "step_precision_table": missing,
                "step_optimizer_table": missing, "step_profile_setup": "not measured"}
    parts_rows = [_row("size", "CLIP", "precision", "step (s)", *(label for _, label in STEP_PARTS),
                       "CPU s / step"), _row(*["---"] * (4 + len(STEP_PARTS) + 1))]
    limit_rows = [_row("size", "precision", "clock", "frozen step (s)", "ideal frozen step (s)", "full step (s)",
                       "measured ratio", "limit", "fraction of limit"), _row(*["---"] * 9)]
    precision_rows = [_row("size", "CLIP", "fp32 s / step", "bf16 s / step", "bf16 speed-up", "fp32 CPU s",
                           "bf16 CPU s", "bf16 CPU speed-up"), _row(*["---"] * 8)]
    optimizer_rows = [_row("size", "parameters", "per-tensor loop (s)", "fused (s)", "speed-up", "per-tensor CPU s",
                           "fused CPU s", "CPU speed-up"), _row(*["---"] * 8)]
    for record in profile["sizes"].values():
        runs = record["runs"]
        for key, run in runs.items():
            mode, precision = key.split("_", 1)
            parts_rows.append(_row(record["label"], mode, precision, _number(run["step_s"], 3),
                                   *(_number(run["parts_s"][part], 3) for part, _ in STEP_PARTS),
                                   _number(run["cpu_step_s"], 3)))
        for key, summary in record["ratios"].items():
            precision, _, clock = key.partition("_")
            limit_rows.append(_row(record["label"], precision, "CPU" if clock else "wall",
                                   _number(summary["frozen_step_s"], 3), _number(summary["ideal_frozen_step_s"], 3),
                                   _number(summary["full_step_s"], 3), _number(summary["measured_ratio"], 2),
                                   _number(summary["limit"], 2), _number(summary["fraction_of_limit"], 3)))
        for mode in ("frozen", "full"):
            fp32, bf16 = runs.get(f"{mode}_fp32"), runs.get(f"{mode}_bf16")
            if fp32 is None or bf16 is None:
                continue
            precision_rows.append(_row(record["label"], mode, _number(fp32["step_s"], 3), _number(bf16["step_s"], 3),
                                       f"{fp32['step_s'] / bf16['step_s']:.2f}x", _number(fp32["cpu_step_s"], 3),
                                       _number(bf16["cpu_step_s"], 3),
                                       f"{fp32['cpu_step_s'] / bf16['cpu_step_s']:.2f}x"))
        for mode, cut in record.get("optimizer_cut", {}).items():
            before, after = cut["per_tensor"], cut["fused"]
            optimizer_rows.append(_row(record["label"], "learned parts (frozen CLIP)" if mode == "frozen" else "all",
                                       _number(before["s"], 3), _number(after["s"], 3),
                                       f"{before['s'] / after['s']:.2f}x", _number(before["cpu_s"], 3),
                                       _number(after["cpu_s"], 3), f"{before['cpu_s'] / after['cpu_s']:.2f}x"))
    environment = profile["environment"]
    setup = (f"measured {profile['created']} on {environment.get('gpu', environment['device'])}, "
             f"torch threads: {environment['threads']}, load average (1 min) before / after "
             f"{profile['load_average']['before']:.1f} / {profile['load_average']['after']:.1f}")
    return {"step_profile_table": "\n".join(parts_rows), "step_limit_table": "\n".join(limit_rows),
            "step_precision_table": "\n".join(precision_rows), "step_optimizer_table": "\n".join(optimizer_rows),
            "step_profile_setup": setup}


def render_markdown(results: dict[str, Any], results_path: str = "bench/results.json",
                    template: Path = TEMPLATE) -> str:
    """``docs/BENCHMARKS.md``: the hand-written template with this run's tables filled in."""
    training, ratio = results["training"], results["ratios"]
    labels = {"weakclip": "WeakCLIP, CLIP frozen (the method)",
              "weakclip_full_finetune": "WeakCLIP, CLIP unfrozen (full fine-tuning)",
              "mctformer": "MCTformer-V2 (DeiT-S)"}
    training_rows = [_row("model", "input", "batch", "s/step", "images/s", "CPU s/step", "images/CPU-s",
                          "peak memory (MiB)", "growth during steps (MiB)", "trainable / total params"),
                     _row(*["---"] * 10)]
    for key, label in labels.items():
        record = training[key]
        parameters = f"{record['trainable_parameters'] / 1e6:.2f}M / {record['total_parameters'] / 1e6:.2f}M"
        training_rows.append(_row(label, record["input_size"], record["batch_size"], _number(record["s_per_step"], 3),
                                  _number(record["images_per_s"], 3), _number(record.get("cpu_s_per_step"), 3),
                                  _number(record.get("images_per_cpu_s"), 4), _number(record["peak_memory_mib"], 0),
                                  _number(record["train_memory_mib"], 0),
                                  parameters))
    ratio_rows = [_row("ratio", "value"), _row("---", "---")]
    ratio_rows += [_row(name.replace("_", " "), f"{value:.3f}") for name, value in ratio.items()]
    paper = results["parameters"]["paper_size"]
    inference = results["pseudo_inference"]
    crf = results["crf"]
    store = results["cam_store"]
    store_rows = [_row("store", "images", "bytes / image", "raw float32 bytes / image", "raw / store"),
                  _row(*["---"] * 5),
                  _row(store["synthetic"]["source"], store["synthetic"]["n_images"],
                       _number(store["synthetic"]["bytes_per_image"], 0),
                       _number(store["synthetic"]["raw_float32_bytes_per_image"], 0),
                       f"{store['synthetic']['compression_ratio']:.1f}x")]
    if store.get("project") is not None:
        project = store["project"]
        store_rows.append(_row(project["source"], project["n_images"], _number(project["bytes_per_image"], 0),
                               _number(project["raw_float32_bytes_per_image"], 0),
                               f"{project['compression_ratio']:.1f}x"))
    cam_rows = [_row("classes (with background)", "images x size", "labels / image", "s / image", "peak memory (MiB)",
                     "growth during the call (MiB)"), _row(*["---"] * 6)]
    for record in (results.get("cam_inference") or {}).values():  # absent from results written before it existed
        cam_rows.append(_row(record["n_classes"], f"{record['n_images']} x {record['image_size'][0]}x"
                             f"{record['image_size'][1]}", record["labels_per_image"], _number(record["s_per_image"], 3),
                             _number(record["peak_memory_mib"], 0), _number(record["growth_memory_mib"], 0)))
    stages = results["stage_timings"]
    stage_rows = [_row("stage", "wall time (s)", "source"), _row("---", "---", "---")]
    stage_rows += [_row(f"`{stage}`", _number(seconds, 1), stages["sources"][stage])
                   for stage, seconds in stages["seconds"].items()]
    stage_rows += [_row(f"`{stage}`", "not measured", "no timings/ record and no `make repro` record; run "
                                                       "`python -m bench.run` (full) after `make repro`")
                   for stage in stages["missing"]]
    environment = results["environment"]
    fields = {
        "created": results["created"],
        "mode": results["mode"],
        "device": environment.get("gpu", environment["device"]),
        "machine": environment.get("machine", f"{environment['cpu_count']} CPUs, the model not recorded"),
        "threads": environment["threads"],
        "torch": environment["torch"],
        "wall_s": _number(results["wall_s"], 1),
        "load_before": f"{results['load_average']['before']:.1f}",
        "load_after": f"{results['load_average']['after']:.1f}",
        "results_path": results_path,
        "training_table": "\n".join(training_rows),
        "ratio_table": "\n".join(ratio_rows),
        "speed_vs_full_finetune": f"{ratio['speed_vs_full_finetune']:.2f}",
        "cpu_speed_vs_full_finetune": _number(ratio.get("cpu_speed_vs_full_finetune")),
        "memory_saving_vs_full_finetune": f"{100 * (1 - ratio['peak_memory_vs_full_finetune']):.1f}",
        "paper_trainable": f"{paper['trainable'] / 1e6:.2f}M",
        "paper_total": f"{paper['total'] / 1e6:.2f}M",
        "paper_fraction": f"{100 * paper['trainable_fraction']:.1f}",
        "inference_images_per_s": _number(inference["images_per_s"], 4),
        "inference_rate_source": inference.get("rate_source", "bench_dense_model"),
        "inference_setup": (f"{inference['image_size'][0]}x{inference['image_size'][1]} image, scales "
                            f"{inference['scales']}, flip {inference['flip']}, window {inference['crop']} "
                            f"stride {inference['stride']}"),
        "crf_table": "\n".join([
            _row("workers", "images/s", "s / image"), _row("---", "---", "---"),
            _row(1, _number(crf["workers_1"]["images_per_s"], 3), _number(crf["workers_1"]["s_per_image"], 3)),
            _row(2, _number(crf["workers_2"]["images_per_s"], 3), _number(crf["workers_2"]["s_per_image"], 3)),
        ]),
        "crf_setup": (f"{crf['workers_1']['n_images']} images of {crf['workers_1']['image_size'][0]}x"
                      f"{crf['workers_1']['image_size'][1]}, K = {crf['workers_1']['n_classes']}, "
                      f"{crf['workers_1']['iterations']} iterations"),
        "crf_speedup": f"{crf['speedup_2_vs_1']:.2f}",
        "cam_store_table": "\n".join(store_rows),
        "cam_inference_table": "\n".join(cam_rows),
        "stage_table": "\n".join(stage_rows),
        "stage_total": _number(stages["total_s"], 1),
        "gpu_table": gpu_section(GPU_SPEED_FILES),
        **step_profile_fields(results.get("step_profile")),
    }
    return string.Template(template.read_text()).substitute(fields)


# --------------------------------------------------------------------------- the suite

def measure_step_profile(size: str, device: str) -> dict[str, Any]:
    """The ``step_profile`` child's record, with when it ran and the load around it (it can be re-measured
    alone, ``--step-profile-only``, so it carries its own)."""
    load_before = os.getloadavg()[0]
    record = run_child("step_profile", size, device)
    return {**record, "created": now(), "load_average": {"before": load_before, "after": os.getloadavg()[0]}}


def run_suite(quick: bool, device: str, measure_stage_timings: bool, timings_dir: Path = TIMINGS_DIR,
              progress=print) -> dict[str, Any]:
    """Every measurement of the module docstring; returns the results dict (what results.json holds)."""
    size = "quick" if quick else "full"
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    training = {}
    for name in ("weakclip", "weakclip_full_finetune", "mctformer"):
        progress(f"bench: {name} training ({size}) ...")
        training[name] = run_child(name, size, device)
    progress(f"bench: pseudo-mask inference, dense CRF (1 and 2 workers), CAM store ({size}) ...")
    rest = run_child("inference_crf_store", size, device)
    inference, crf, cam_store = rest["pseudo_inference"], rest["crf"], rest["cam_store"]
    progress(f"bench: CAM inference, VOC's and COCO's class counts ({size}) ...")
    cam_inference = {}
    for dataset in ("voc", "coco"):
        cam_inference[dataset] = run_child(f"cam_inference_{dataset}", size, device)
        cam_inference[dataset].pop("environment", None)
    progress(f"bench: one training step split by part, frozen / unfrozen, fp32 / bf16 ({size}) ...")
    step_profile = measure_step_profile(size, device)
    progress("bench: stage timings ...")
    parameters = {
        "paper_size": rest["paper_size_parameters"],
        "measured_weakclip": {"trainable": training["weakclip"]["trainable_parameters"],
                              "total": training["weakclip"]["total_parameters"],
                              "trainable_fraction": training["weakclip"]["trainable_parameters"]
                              / training["weakclip"]["total_parameters"]},
    }
    dataset_name = load_params(REPO / "params.yaml").dataset.name
    stage_timings = collect_stage_timings(REPO, measure_stage_timings, timings_dir,
                                          repro_records(dataset_name, timings_dir))
    environment = training["weakclip"].pop("environment")
    for record in training.values():
        record.pop("environment", None)
    return {
        "created": now(),
        "mode": size,
        "environment": {**environment, "machine": machine_description()},
        "training": training,
        "ratios": ratios(training),
        "parameters": parameters,
        "pseudo_inference": inference,
        "crf": crf,
        "cam_store": cam_store,
        "cam_inference": cam_inference,
        "stage_timings": stage_timings,
        "step_profile": step_profile,
        "paper_claim": PAPER_CLAIM,
        "wall_s": time.perf_counter() - started,
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
    }


def check_finite(results: Any, path: str = "") -> None:
    """Every number in the results is finite (a NaN in a benchmark file is a bug, not a result)."""
    if isinstance(results, dict):
        for key, value in results.items():
            check_finite(value, f"{path}.{key}" if path else key)
    elif isinstance(results, list):
        for index, value in enumerate(results):
            check_finite(value, f"{path}[{index}]")
    elif isinstance(results, float) and not math.isfinite(results):
        raise ValueError(f"bench result {path} is {results}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models: the same code paths in well under a minute")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--results", type=Path, default=None,
                        help="default: bench/results.json (full) or bench/out/results.quick.json (--quick)")
    parser.add_argument("--doc", type=Path, default=None,
                        help="default: docs/BENCHMARKS.md (full) or bench/out/BENCHMARKS.quick.md (--quick)")
    parser.add_argument("--no-stage-timing", action="store_true",
                        help="full run: do not re-run stages without a timings/ record (read recorded times only)")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: rewrite the page from an existing results file (after a template edit)")
    parser.add_argument("--step-profile-only", action="store_true",
                        help="measure only the step profile (bench.step_profile) into the existing results file, "
                             "then rewrite the page")
    parser.add_argument("--child", choices=CHILDREN, help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=["quick", "full"], default="full", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, args.size, args.device)
        return 0
    results_path = (args.results or (REPO / "bench" / "out" / "results.quick.json" if args.quick
                                     else REPO / "bench" / "results.json")).resolve()
    doc_path = (args.doc or (REPO / "bench" / "out" / "BENCHMARKS.quick.md" if args.quick
                             else REPO / "docs" / "BENCHMARKS.md")).resolve()
    if args.render_only:
        results = json.loads(results_path.read_text())
    elif args.step_profile_only:
        results = json.loads(results_path.read_text())
        if results["mode"] != ("quick" if args.quick else "full"):
            parser.error(f"{results_path} holds a {results['mode']} run: measure the same size into it")
        results["step_profile"] = measure_step_profile(results["mode"], args.device)
        check_finite(results)
        write_json(results_path, results)
    else:
        results = run_suite(args.quick, args.device, measure_stage_timings=not args.quick and not args.no_stage_timing)
        check_finite(results)
        write_json(results_path, results)
    with atomic_path(doc_path, suffix=".md") as temporary:
        shown = results_path.relative_to(REPO) if results_path.is_relative_to(REPO) else results_path
        temporary.write_text(render_markdown(results, str(shown)))
    ratio = results["ratios"]
    print(f"bench ({results['mode']}, {results['wall_s']:.0f} s): WeakCLIP frozen vs full fine-tune: "
          f"{ratio['speed_vs_full_finetune']:.2f}x images/s, {ratio['peak_memory_vs_full_finetune']:.2f}x peak memory; "
          f"vs MCTformer: {ratio['speed_vs_mctformer']:.2f}x images/s -> {results_path}, {doc_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

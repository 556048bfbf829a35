"""The Python half of ``bench/gpu_check.sh``: the training stages on a GPU, plain and under torchrun, and
the speed of a full-size WeakCLIP training step.

``python -m bench.gpu_check stages --device cuda --work DIR``
    builds the tiny chain (tests/faults/tiny_chain.py: prepare → clip → cam_train → cam_infer) in ``DIR``,
    then runs cam_train, weakclip_train and seg_train@gt twice each in fresh copies of it: with
    ``runtime.launcher: none`` and with ``launcher: torchrun, nproc: 1`` (a real process group: NCCL on
    CUDA, Gloo on CPU; DDP-wrapped models, SyncBatchNorm). Prints each run's wall time; fails when a run
    fails or a declared output is missing.
``python -m bench.gpu_check weakclip-speed --device cuda --size full``
    times WeakCLIP training steps (ViT-B/16 at 512, K = 21, random CLIP weights, batch 8, fp32: no AMP)
    and prints images/s and the peak ``torch.cuda.max_memory_allocated``. ``--size quick`` is the tiny
    model, for a dry run on CPU.
``python -m bench.gpu_check step-profile --device cuda --size full``
    one full-size training step split by part (``bench.step_profile``: CLIP forward, heads, CRF target,
    backward, optimizer), CLIP frozen and unfrozen, fp32 and bf16 autocast, with the frozen / full ratio's
    limit; ``torch.cuda.synchronize`` around every part.
``python -m bench.gpu_check summary --stages stages.json --speed speed.json``
    prints the closing block of the log: each stage's wall time with launcher none and torchrun nproc 1
    side by side, and the WeakCLIP speed. Both commands above write these JSON files (``--results``),
    the stages one after every run, so a run cut short by its timeout still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "faults"))
from tiny_chain import run_stage, stage_env, write_project  # noqa: E402

from weakclip_core.artifacts.atomic import write_json  # noqa: E402

SETUP_STAGES = ("prepare", "clip", "cam_train", "cam_infer")
# (name, module arguments, outputs that must exist afterwards)
TIMED_STAGES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("cam_train", ("-m", "pipeline.cam_train"), ("artifacts/mctformer/model.pt", "dvclive/cam_train/metrics.json")),
    ("weakclip_train", ("-m", "pipeline.weakclip_train"),
     ("artifacts/weakclip/model.pt", "metrics/weakclip.json", "dvclive/weakclip_train/metrics.json")),
    ("seg_train@gt", ("-m", "pipeline.seg_train", "--source", "gt"),
     ("artifacts/seg/gt/model.pt", "dvclive/seg_train_gt/metrics.json")),
)
LAUNCHERS = (("none", {"launcher": "none", "nproc": 1}), ("torchrun1", {"launcher": "torchrun", "nproc": 1}))


def run_stages(device: str, work: Path, results: Path | None = None) -> None:
    """Build the tiny chain in ``work/base`` and time each training stage under each launcher.

    With ``results``, rewrites that JSON file after every run: ``{"device", "setup": {stage: seconds},
    "runs": [{"stage", "launcher", "seconds", "status", "missing"}]}``.
    """
    setup: dict[str, float] = {}
    runs: list[dict[str, object]] = []

    def save() -> None:
        if results is not None:
            write_json(results, {"device": device, "setup": setup, "runs": runs})

    base = write_project(work / "base", overrides={"runtime": {"device": device}})
    for stage in SETUP_STAGES:
        started = time.perf_counter()
        run_stage(base, stage)
        seconds = time.perf_counter() - started
        setup[stage] = round(seconds, 2)
        print(f"setup {stage:<15} {seconds:6.1f} s", flush=True)
        save()
    failures = []
    for name, arguments, outputs in TIMED_STAGES:
        for launcher, runtime in LAUNCHERS:
            project = work / f"{name.replace('@', '_')}_{launcher}"
            shutil.copytree(base, project)
            for relative in outputs:  # the copy must not already hold what the run is to write
                target = project / relative
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
            shutil.rmtree(project / "checkpoints", ignore_errors=True)
            write_project(project, overrides={"runtime": {"device": device, **runtime}})
            started = time.perf_counter()
            completed = subprocess.run([sys.executable, *arguments, "--params", "params.yaml"], cwd=project,
                                       env=stage_env(), capture_output=True, text=True)
            seconds = time.perf_counter() - started
            missing = [relative for relative in outputs if not (project / relative).is_file()]
            status = "ok" if completed.returncode == 0 and not missing else "FAILED"
            print(f"{name:<15} launcher={launcher:<10} {seconds:6.1f} s  {status}"
                  + (f"  missing: {missing}" if missing else ""), flush=True)
            runs.append({"stage": name, "launcher": launcher, "seconds": round(seconds, 2), "status": status,
                         "missing": missing, "returncode": completed.returncode})
            save()
            if status != "ok":
                failures.append(name)
                print(completed.stdout[-2000:], completed.stderr[-4000:], sep="\n", flush=True)
    if failures:
        raise SystemExit(f"gpu_check: {len(failures)} stage run(s) failed: {failures}")


def weakclip_speed(device_name: str, size_name: str, batch_size: int, timed_steps: int,
                   results: Path | None = None) -> None:
    """Images/s and peak memory of WeakCLIP training steps (frozen CLIP, fp32) at ``size_name``; with
    ``results``, also writes the measurement record (``bench.measure``'s keys plus size and peak) there."""
    from bench.measure import measure_weakclip_training, size_named

    device = torch.device(device_name)
    size = replace(size_named(size_name), batch_size=batch_size, warmup_steps=2, timed_steps=timed_steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    record = measure_weakclip_training(size, device, full_finetune=False)
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    print(f"weakclip_speed size={size.name} input={size.input_size} K={size.n_classes} batch={batch_size} "
          f"amp=off device={device}: {record['images_per_s']:.2f} images/s, {record['s_per_step']:.3f} s/step "
          f"(median of {timed_steps}; steps {record['step_seconds']}), peak torch.cuda.max_memory_allocated "
          f"{peak_gib:.2f} GiB, trainable {record['trainable_parameters']:,} / {record['total_parameters']:,} "
          f"parameters, {time.perf_counter() - started:.1f} s in all", flush=True)
    if results is not None:
        write_json(results, {**record, "device": str(device), "size": size.name, "input_size": size.input_size,
                             "n_classes": size.n_classes, "amp": False, "timed_steps": timed_steps,
                             "peak_max_memory_allocated_gib": None if math.isnan(peak_gib) else round(peak_gib, 3),
                             "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"})


def step_profile(device_name: str, size_name: str, results: Path | None = None) -> None:
    """``bench.step_profile`` at the paper size (``full``) or the tiny model (``quick``), fp32 and bf16; prints
    each run's parts and the ratio summaries; with ``results``, writes the record there."""
    from bench.step_profile import paper_profile_size, profile_size, quick_profile_size

    device = torch.device(device_name)
    size = paper_profile_size() if size_name == "full" else quick_profile_size()
    record = profile_size(size, device, progress=lambda line: print(line, flush=True))
    for key, run in record["runs"].items():
        parts = ", ".join(f"{part} {seconds:.3f}" for part, seconds in run["parts_s"].items())
        print(f"step_profile {key}: {run['step_s']:.3f} s/step ({parts})", flush=True)
    for key, summary in record["ratios"].items():
        print(f"step_profile ratio {key}: measured {summary['measured_ratio']:.2f}, limit {summary['limit']:.2f}, "
              f"fraction {summary['fraction_of_limit']:.3f}", flush=True)
    if results is not None:
        write_json(results, {**record, "device": str(device), "size": size_name,
                             "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"})


def print_summary(stages_path: Path, speed_path: Path) -> None:
    """The log's closing block, read from the JSON files the two measuring commands wrote (either may be
    absent or partial when its command failed or ran out of time: the block says so)."""
    print("stage wall times (tiny chain, one process each; torchrun1 = torchrun --nproc_per_node 1):")
    if stages_path.is_file():
        stages = json.loads(stages_path.read_text())
        seconds = {(run["stage"], run["launcher"]): run for run in stages["runs"]}
        print(f"  {'stage':<15} {'none':>9} {'torchrun1':>10} {'torchrun1 - none':>17}")
        for name, _, _ in TIMED_STAGES:
            runs = [seconds.get((name, launcher)) for launcher, _ in LAUNCHERS]
            cells = [f"{run['seconds']:7.1f} s" + ("" if run["status"] == "ok" else "!") if run else "    (none)"
                     for run in runs]
            delta = (f"{runs[1]['seconds'] - runs[0]['seconds']:+15.1f} s" if all(runs) else f"{'-':>17}")
            print(f"  {name:<15} {cells[0]:>9} {cells[1]:>10} {delta}")
        failed = [f"{run['stage']}/{run['launcher']}" for run in stages["runs"] if run["status"] != "ok"]
        done = len(stages["runs"])
        print(f"  runs finished: {done} of {len(TIMED_STAGES) * len(LAUNCHERS)}; failed (marked !): {failed or 'none'}")
    else:
        print(f"  no results: {stages_path} was not written (the chain's setup failed or timed out)")
    print("WeakCLIP training speed (frozen CLIP, fp32: AMP off, CRF boundary loss on):")
    if speed_path.is_file():
        speed = json.loads(speed_path.read_text())
        peak = speed["peak_max_memory_allocated_gib"]
        print(f"  size {speed['size']} input {speed['input_size']} K={speed['n_classes']} batch {speed['batch_size']} "
              f"on {speed['device_name']}: {speed['images_per_s']:.2f} images/s, {speed['s_per_step']:.3f} s/step "
              f"(median of {speed['timed_steps']}), peak torch.cuda.max_memory_allocated "
              + (f"{peak:.2f} GiB" if peak is not None else "n/a (CPU)"))
    else:
        print(f"  no results: {speed_path} was not written (the speed run failed or timed out)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    stages = commands.add_parser("stages", help="time the tiny training stages with and without torchrun")
    stages.add_argument("--device", choices=("cuda", "cpu"), required=True)
    stages.add_argument("--work", type=Path, required=True, help="an empty scratch folder")
    speed = commands.add_parser("weakclip-speed", help="time full-size WeakCLIP training steps")
    speed.add_argument("--device", choices=("cuda", "cpu"), required=True)
    speed.add_argument("--size", choices=("full", "quick"), default="full")
    speed.add_argument("--batch-size", type=int, default=8)
    speed.add_argument("--steps", type=int, default=5, help="timed steps after 2 warm-up steps")
    profile = commands.add_parser("step-profile", help="one full-size training step split by part, fp32 and bf16")
    profile.add_argument("--device", choices=("cuda", "cpu"), required=True)
    profile.add_argument("--size", choices=("full", "quick"), default="full")
    for command in (stages, speed, profile):
        command.add_argument("--results", type=Path, help="JSON file to write the measurements to")
    summary = commands.add_parser("summary", help="print the closing summary from the two JSON files")
    summary.add_argument("--stages", type=Path, required=True)
    summary.add_argument("--speed", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "stages":
        run_stages(args.device, args.work, args.results)
    elif args.command == "weakclip-speed":
        weakclip_speed(args.device, args.size, args.batch_size, args.steps, args.results)
    elif args.command == "step-profile":
        step_profile(args.device, args.size, args.results)
    else:
        print_summary(args.stages, args.speed)


if __name__ == "__main__":
    main()

"""The tiny chain the fault tests run: a params file, a project folder, stages run as real processes.

A *project folder* is a tmp folder that plays the repository root: ``params.yaml``
with every section at toy size (32-px synthetic images, 3 classes, models of a
few thousand weights, one thread) and the stages' default relative paths
(``data/``, ``artifacts/``, ``metrics/``, ``checkpoints/`` ...). Stages run as
``python -m pipeline.<stage> --params params.yaml`` in that folder, exactly as
``dvc repro`` runs them, so a SIGKILL is a real one.

Run as a script, this module is the *kill harness*: it runs one stage in this
process and SIGKILLs the process itself at the ``n``-th occurrence of an event
(an optimizer step, a CAM written to the store, or an atomic rename about to
happen: the temporary file is complete but not yet under its final name)::

    python tests/faults/tiny_chain.py --kill-at replace --after 7 -- pipeline.cam_train --params params.yaml

Counting events instead of sleeping makes the kill point reproducible on a
loaded machine; the tests draw ``n`` from a seeded RNG.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import runpy
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).resolve()
KILLED_RETURNCODE = -signal.SIGKILL

TINY_PARAMS: dict[str, Any] = {
    "runtime": {"device": "cpu", "seed": 0, "threads": 1},
    "dataset": {"name": "synthetic", "seed": 0, "prepared_dir": "data/prepared/tiny",
                "synthetic": {"image_size": 32, "n_train": 12, "n_val": 4, "n_classes": 3, "min_objects": 1,
                              "max_objects": 2, "distractors": 1, "workers": 1}},
    "clip": {"source": "random",
             "arch": {"embed_dim": 16, "image_size": 32, "patch_size": 8, "vision_width": 16, "vision_layers": 4,
                      "vision_head_width": 8, "text_width": 16, "text_layers": 1, "text_heads": 2,
                      "context_length": 16}},
    "cam": {"arch": {"image_size": 32, "patch_size": 8, "width": 16, "depth": 3, "heads": 2, "mlp_ratio": 2.0,
                     "drop_path": 0.1},
            "train": {"epochs": 2, "batch_size": 4, "lr": 0.05, "warmup_epochs": 1, "checkpoint_every": 1,
                      "workers": 0},
            "infer": {"scales": [1.0, 0.75], "flip": True, "attention_layers": 2, "batch_size": 2}},
    "weakclip": {"prompt_len": 2, "text_context_length": 6, "taps": [0, 1, 2, 3], "co_attention_width": 16,
                 "co_attention_heads": 2, "co_attention_layers": 1, "neck_width": 16, "head_width": 16,
                 "seeds": {"mode": "confident", "fg_threshold": 0.4, "bg_threshold": 0.15},
                 "loss": {"loss_size": 16, "crf_workers": 0, "crf": {"iterations": 2}},
                 "train": {"iterations": 6, "batch_size": 4, "lr": 0.001, "warmup_iterations": 2, "crop": 32,
                           "checkpoint_every": 1, "workers": 0}},
    "pseudo": {"scales": [1.0, 0.75], "flip": True, "crop": 32, "stride": 16, "batch_size": 2, "workers": 0,
               "use_crf": True, "output_dir": "data/pseudo_masks", "overlay_samples": 2,
               "crf": {"iterations": 3}},
    "seg": {"model": "deeplabv3plus", "encoder": "resnet18",
            "train": {"epochs": 2, "batch_size": 4, "crop": 32, "checkpoint_every": 1, "workers": 0}},
}

# The stages in chain order, as (name, module, extra arguments).
CHAIN: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("prepare", "pipeline.prepare", ("--no-progress",)),
    ("clip", "pipeline.clip", ()),
    ("cam_train", "pipeline.cam_train", ()),
    ("cam_infer", "pipeline.cam_infer", ()),
    ("weakclip_train", "pipeline.weakclip_train", ()),
    ("pseudo_masks", "pipeline.pseudo_masks", ()),
    ("seg_train", "pipeline.seg_train", ("--source", "pseudo")),
)
STAGE_MODULES = {name: (module, extra) for name, module, extra in CHAIN}

# What each stage writes (dvc.yaml's outs, metrics and dvclive folders), relative to the project folder.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "prepare": ("data/prepared/tiny", "reports/dataset_preview.png"),
    "clip": ("artifacts/clip", "metrics/clip.json"),
    "cam_train": ("artifacts/mctformer", "dvclive/cam_train"),
    "cam_infer": ("artifacts/cams/train.h5", "metrics/cam.json", "plots/cam_threshold.csv"),
    "weakclip_train": ("artifacts/weakclip", "metrics/weakclip.json", "dvclive/weakclip_train"),
    "pseudo_masks": ("data/pseudo_masks", "metrics/pseudo.json", "reports/pseudo"),
    "seg_train": ("artifacts/seg/pseudo", "dvclive/seg_train_pseudo"),
}




def tiny_params(seed: int = 0, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The tiny params mapping with ``runtime.seed = seed`` and ``overrides`` deep-merged in."""
    params = copy.deepcopy(TINY_PARAMS)
    params["runtime"]["seed"] = seed

    def merge(into: dict[str, Any], update: dict[str, Any]) -> None:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    merge(params, overrides or {})
    return params


def params_text(params: dict[str, Any]) -> str:
    """``params`` as a ``params.yaml`` that sets every key, as the repository's own does: the keys ``params`` leaves
    out written with the built-in defaults they take anyway, so the stages print no note about them (stderr is
    what the fault tests check). A mapping the loader refuses (the bad-params tests) is written as given: it
    stops the stage before any note."""
    from weakclip_core.config import ConfigError, params_from_dict, to_plain  # noqa: PLC0415 (the harness runs bare)

    try:
        complete = to_plain(params_from_dict(copy.deepcopy(params)))
    except ConfigError:
        complete = params
    return yaml.safe_dump(complete, sort_keys=False)


def write_project(folder: Path, seed: int = 0, overrides: dict[str, Any] | None = None) -> Path:
    """Create ``folder`` with a tiny ``params.yaml``; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(params_text(tiny_params(seed, overrides)))
    return folder


def stage_env() -> dict[str, str]:
    """The environment a stage process gets: the repository importable, offline, one thread."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""), DVC_NO_ANALYTICS="1",
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0",
               PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""))
    return env


def stage_command(stage: str) -> list[str]:
    module, extra = STAGE_MODULES[stage]
    return [sys.executable, "-m", module, "--params", "params.yaml", *extra]


def run_stage(project: Path, stage: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one stage to completion in ``project``; with ``check`` a failure shows the stage's stderr."""
    completed = subprocess.run(stage_command(stage), cwd=project, env=stage_env(), capture_output=True, text=True)
    if check and completed.returncode != 0:
        raise AssertionError(f"{stage} failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}")
    return completed


def run_chain(project: Path, stages: tuple[str, ...]) -> None:
    for stage in stages:
        run_stage(project, stage)


def run_stage_killed(project: Path, stage: str, event: str, after: int) -> subprocess.CompletedProcess[str]:
    """Run ``stage`` under the kill harness: it SIGKILLs itself at the ``after``-th ``event``."""
    module, extra = STAGE_MODULES[stage]
    command = [sys.executable, str(HARNESS), "--kill-at", event, "--after", str(after), "--", module,
               "--params", "params.yaml", *extra]
    return subprocess.run(command, cwd=project, env=stage_env(), capture_output=True, text=True)


def copy_without(reference: Path, destination: Path, stage: str) -> Path:
    """Copy the reference project to ``destination`` minus ``stage``'s outputs (its inputs stay)."""
    shutil.copytree(reference, destination)
    for relative in STAGE_OUTPUTS[stage]:
        path = destination / relative
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    shutil.rmtree(destination / "checkpoints", ignore_errors=True)
    return destination


# --------------------------------------------------------------------------- comparing outputs

def is_temporary(path: Path) -> bool:
    """The atomic writers' temporary names: ``.<final name>.<random>.tmp[.ext]``."""
    return path.name.startswith(".") and ".tmp" in path.name


def output_files(project: Path, stage: str) -> dict[str, Path]:
    """Every final-named file a stage wrote, keyed by its path relative to ``project``."""
    files: dict[str, Path] = {}
    for relative in STAGE_OUTPUTS[stage]:
        root = project / relative
        candidates = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in candidates:
            if not any(is_temporary(part) for part in path.relative_to(project).parents if part.name) \
                    and not is_temporary(path):
                files[str(path.relative_to(project))] = path
    return files


def differing_files(first: Path, second: Path, stage: str) -> list[str]:
    """Relative paths whose content differs (or exists in one project only) for ``stage``'s outputs."""
    files_first, files_second = output_files(first, stage), output_files(second, stage)
    differing = sorted(set(files_first) ^ set(files_second))
    for relative in sorted(set(files_first) & set(files_second)):
        if files_first[relative].read_bytes() != files_second[relative].read_bytes():
            differing.append(relative)
    return differing


def unreadable_final_files(folder: Path) -> list[str]:
    """Final-named files under ``folder`` that do not open/parse as their extension says (empty is good).

    ``.pt`` → ``torch.load``; ``.json`` → JSON; ``.jsonl`` → JSON per complete line; ``.png``/``.jpg`` →
    decoded by PIL; ``.h5`` → opened by h5py and marked complete; ``.csv``/``.tsv``/``.yaml`` → parsed.
    Temporary names (``.<name>.<random>.tmp``) are skipped: no reader ever opens them.
    """
    import csv

    import h5py
    import torch
    from PIL import Image

    bad = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if is_temporary(path) or any(is_temporary(parent) for parent in path.relative_to(folder).parents):
            continue
        try:
            suffix = path.suffix
            if suffix == ".pt":
                torch.load(path, map_location="cpu", weights_only=True)
            elif suffix == ".json":
                json.loads(path.read_text())
            elif suffix == ".jsonl":
                for line in path.read_text().splitlines(keepends=True):
                    if line.endswith("\n"):
                        json.loads(line)
            elif suffix in (".png", ".jpg"):
                with Image.open(path) as picture:
                    picture.load()
            elif suffix == ".h5":
                with h5py.File(path, "r") as store:
                    assert int(store.attrs["complete"]) == 1
            elif suffix in (".csv", ".tsv"):
                rows = list(csv.reader(path.open(), delimiter="\t" if suffix == ".tsv" else ","))
                assert rows and all(len(row) == len(rows[0]) for row in rows)
            elif suffix in (".yaml", ".yml"):
                yaml.safe_load(path.read_text())
        except Exception as error:  # noqa: BLE001 — any failure to parse is what we look for
            bad.append(f"{path.relative_to(folder)}: {type(error).__name__}: {error}")
    return bad


# --------------------------------------------------------------------------- the kill harness

def _kill_self() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class KillCounter:
    """Counts events; SIGKILLs this process at the ``after``-th."""

    after: int
    seen: int = 0

    def tick(self) -> None:
        self.seen += 1
        if self.seen >= self.after:
            _kill_self()


def install_kill(event: str, after: int) -> None:
    """Arm the kill: ``step`` (after an optimizer step), ``cam`` (after a CAM is added to the store's
    temporary file) or ``replace`` (just before an atomic writer renames a complete temporary file)."""
    counter = KillCounter(after)
    if event == "step":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(lambda optimizer, args, kwargs: counter.tick())
    elif event == "cam":
        from weakclip_core.artifacts.cam_store import CamStoreWriter

        original_add: Callable[..., None] = CamStoreWriter.add

        def add_then_count(self: CamStoreWriter, *args: Any, **kwargs: Any) -> None:
            original_add(self, *args, **kwargs)
            self._file.flush()
            counter.tick()

        CamStoreWriter.add = add_then_count  # type: ignore[method-assign]
    elif event == "replace":
        original_replace = os.replace

        def count_then_replace(source: Any, destination: Any, *args: Any, **kwargs: Any) -> None:
            if is_temporary(Path(os.fspath(source))):
                counter.tick()
            original_replace(source, destination, *args, **kwargs)

        os.replace = count_then_replace  # type: ignore[assignment]
    else:
        raise ValueError(f"--kill-at: expected step, cam or replace, got {event!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a stage module and SIGKILL it at the n-th event.")
    parser.add_argument("--kill-at", required=True, choices=("step", "cam", "replace"))
    parser.add_argument("--after", type=int, required=True, help="kill at this occurrence (1-based)")
    parser.add_argument("module", help="the stage module, e.g. pipeline.cam_train")
    parser.add_argument("stage_args", nargs=argparse.REMAINDER, help="arguments passed to the stage")
    arguments = parser.parse_args(argv)
    install_kill(arguments.kill_at, arguments.after)
    stage_args = [a for a in arguments.stage_args if a != "--"]
    sys.argv = [arguments.module, *stage_args]
    sys.path.insert(0, str(REPO_ROOT))
    runpy.run_module(arguments.module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

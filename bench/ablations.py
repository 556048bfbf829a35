"""The WeakCLIP ablations of issue #5 as DVC experiments, and their table for docs/RESULTS.md.

Why DVC experiments: each ablation is one ``dvc exp run -S key=value
weakclip_train`` on top of the committed baseline, so DVC re-runs only what
the override touches (``weakclip_train``; ``clip`` too for the random-CLIP
row), keeps every variant's params and metrics, and ``dvc exp show`` compares
them with the baseline in one table.

    python -m bench.ablations run [--jobs 2]   # queue every ablation, run the queue, wait
    python -m bench.ablations collect          # dvc exp show --json -> metrics/ablations_weakclip.json

``collect`` writes the rows in the format ``pipeline/summary.py`` renders
(``metrics/ablations*.json``) and re-runs the ``summary`` stage, with the committed baseline first and each
row's gain over the CAM seeds (``metrics/cam.json``: the seeds are the same
for every row, since no ablation touches the CAM stages).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.dvc_cli import capture_command, dvc_command, tool_environment
from weakclip_core.artifacts.atomic import write_json

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "metrics" / "ablations_weakclip.json"
WEAKCLIP_METRICS = "metrics/weakclip.json"
CAM_METRICS = REPO / "metrics" / "cam.json"
TARGET = "weakclip_train"


@dataclass(frozen=True)
class Ablation:
    """One experiment: its ``dvc exp`` name, the row label, and the ``-S`` overrides."""

    name: str
    setting: str
    overrides: tuple[str, ...]


ABLATIONS: tuple[Ablation, ...] = (
    Ablation("abl-prompt-2", "N = 2 learnable contexts", ("weakclip.prompt_len=2",)),
    Ablation("abl-prompt-4", "N = 4 learnable contexts", ("weakclip.prompt_len=4",)),
    Ablation("abl-prompt-16", "N = 16 learnable contexts (text context 24 tokens)",
             ("weakclip.prompt_len=16", "weakclip.text_context_length=24")),
    Ablation("abl-temp-1", "temperature init 1", ("weakclip.temperature_init=1.0",)),
    Ablation("abl-temp-0.01", "temperature init 0.01", ("weakclip.temperature_init=0.01",)),
    Ablation("abl-temp-0.001", "temperature init 0.001", ("weakclip.temperature_init=0.001",)),
    Ablation("abl-boundary", "boundary loss on (the paper's weight 1)", ("weakclip.loss.boundary_weight=1.0",)),
    Ablation("abl-no-coattention", "no co-attention (plain cosine matching)", ("weakclip.co_attention=false",)),
    Ablation("abl-dense-seeds", "dense argmax seeds instead of confident", ("weakclip.seeds.mode=dense",)),
    Ablation("abl-random-clip", "randomly initialised CLIP", ("clip.source=random",)),
)
"""The grid of issue #5 beside the synthetic default (N = 8, temperature init 0.1, co-attention, confident seeds,
the pretrained CLIP, and the boundary loss off: params.yaml says why); each row changes one thing."""


def dvc(*arguments: str) -> str:
    """``dvc <arguments>`` in the repository through the flows' runner (venv first on PATH, analytics off);
    its stdout, or ``CommandFailed`` naming the command and its output's tail."""
    return capture_command(dvc_command(*arguments), REPO)


def queue_and_run(jobs: int, poll_s: float = 15.0) -> None:
    """Queue every ablation, start ``jobs`` workers, and wait until the queue has drained."""
    for ablation in ABLATIONS:
        arguments = [argument for override in ablation.overrides for argument in ("-S", override)]
        dvc("exp", "run", "--queue", "--name", ablation.name, *arguments, TARGET)
        print(f"queued {ablation.name}: {' '.join(ablation.overrides)}", flush=True)
    # The workers outlive `dvc queue start` and inherit its output: hand them /dev/null, or a captured
    # pipe stays open (and this call blocks) until the queue has drained.
    subprocess.run(dvc_command("queue", "start", "--jobs", str(jobs)), cwd=REPO, env=tool_environment(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    while True:
        status = dvc("queue", "status")
        busy = [line for line in status.splitlines() if re.search(r"\s(Running|Queued)\s*$", line)]
        if not busy:
            break
        print(f"{len(busy)} experiments queued or running", flush=True)
        time.sleep(poll_s)
    failed = [line for line in dvc("queue", "status").splitlines() if re.search(r"\sFailed\s*$", line)]
    if failed:
        raise RuntimeError("failed experiments (see `dvc queue logs <name>`):\n" + "\n".join(failed))


def experiment_metrics(exp_show: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{experiment name: metrics/weakclip.json data}`` from ``dvc exp show --json`` (newest rev wins)."""
    found: dict[str, dict[str, Any]] = {}
    for baseline in exp_show:
        for experiment in baseline.get("experiments") or []:
            name = experiment.get("name")
            for revision in experiment.get("revs") or []:
                metrics = ((revision.get("data") or {}).get("metrics") or {}).get(WEAKCLIP_METRICS) or {}
                if name and name not in found and isinstance(metrics.get("data"), dict):
                    found[name] = metrics["data"]
    return found


def ablation_rows(baseline: dict[str, Any], by_name: dict[str, dict[str, Any]], cam_miou: float) -> list[dict[str, Any]]:
    """The table: the baseline, then each ablation that ran, with its gain over the CAM seeds."""
    rows = [{"setting": "default (N = 8, temperature init 0.1, no boundary loss, co-attention, confident seeds, "
                        "pretrained CLIP)", "experiment": "baseline (committed)",
             "weakclip_miou": baseline["miou"], "gain over seeds (points)": round(100 * (baseline["miou"] - cam_miou), 1)}]
    for ablation in ABLATIONS:
        metrics = by_name.get(ablation.name)
        if metrics is None:
            continue
        rows.append({"setting": ablation.setting, "experiment": ablation.name, "weakclip_miou": metrics["miou"],
                     "gain over seeds (points)": round(100 * (metrics["miou"] - cam_miou), 1)})
    return rows


def collect() -> Path:
    """Write ``metrics/ablations_weakclip.json`` from ``dvc exp show --json`` and the committed metrics."""
    # --all-commits: the queue's experiments hang off the commit that was HEAD when each was queued.
    by_name = experiment_metrics(json.loads(dvc("exp", "show", "--json", "--all-commits")))
    missing = [ablation.name for ablation in ABLATIONS if ablation.name not in by_name]
    if len(missing) == len(ABLATIONS):
        raise RuntimeError("no ablation experiment found in `dvc exp show`; run `python -m bench.ablations run`")
    baseline = json.loads((REPO / WEAKCLIP_METRICS).read_text(encoding="utf-8"))
    cam = json.loads(CAM_METRICS.read_text(encoding="utf-8"))
    write_json(OUTPUT, {
        "title": "WeakCLIP ablations (DVC experiments)",
        "description": ("Each row is `dvc exp run -S <override> weakclip_train` on the committed baseline "
                        "(`python -m bench.ablations run`); WeakCLIP train-split mIoU, single scale, no CRF, "
                        f"against the same CAM seeds (cam mIoU {100 * cam['miou']:.1f}). Experiments ran two at a "
                        "time at one thread each, the baseline at two threads: thread count alone moves a "
                        "figure by about a point." + (f" Not run: {', '.join(missing)}." if missing else "")),
        "split": baseline.get("split", "train"),
        "threshold_chosen_with_gt": False,
        "rows": ablation_rows(baseline, by_name, cam["miou"]),
    })
    # The file is a declared dep of summary (dvc.yaml): re-run that one stage now so RESULTS.md and dvc.lock
    # agree with the new table.
    dvc("repro", "--force", "--single-item", "summary")
    return OUTPUT


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "collect"])
    parser.add_argument("--jobs", type=int, default=2, help="experiments run at the same time (dvc queue start -j)")
    arguments = parser.parse_args(argv)
    if arguments.command == "run":
        queue_and_run(arguments.jobs)
    print(f"ablations: {collect()}")


if __name__ == "__main__":
    main()

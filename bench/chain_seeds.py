"""The headline as a spread: the whole chain re-run at other training seeds, as DVC experiments.

Why: one run of the chain is one draw. Another CPU's float kernels, or another thread count, change the CLIP's
weights in the last bits, and training amplifies that into points of mIoU (issue #20 measured a fresh clone on
another 2-core machine 4-5 points off on cam and weakclip). A user checking a run against ours needs the spread
a run falls within, not one number. Each experiment here is ``dvc exp run -S runtime.seed=<s>``: every training
stage (CLIP pre-training, MCTformer, WeakCLIP, both segmenters) draws its init, batch order, augmentation and
dropout from another seed; the dataset (``dataset.seed``) stays the same. Seed 0 is the committed run (the
workspace's ``metrics/summary.json``); seeds 1..N run one at a time at the chain's own thread count, so they
are the same kind of run as ``make repro``.

    python -m bench.chain_seeds run [--seeds 2]   # queue seeds 1..N, run them one by one, wait, collect
    python -m bench.chain_seeds collect           # dvc exp show -> metrics/chain_seeds.json -> RESULTS.md

``collect`` writes ``metrics/chain_seeds.json`` (rendered by ``pipeline/summary.py`` under "Headline over
seeds") and re-runs the ``summary`` stage. Experiment names are ``chain-seed<s>``. It reads the experiments of
every commit that has some, and counts those of commits whose committed run names the outputs ``dvc.lock`` names
for every stage up to ``seg_eval`` (``bench.ablations.baselines_with_these_outputs``; the others are named).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from scipy import stats

from bench.ablations import (committed_dataset, dvc, experiment_metrics, experiments_of_this_benchmark,
                             failed_task_ids, mean_and_std, queue_experiment, wait_for_queue)
from pipeline.summary import FIGURES, gt_flag, read_metrics
from weakclip_core.artifacts.atomic import write_json

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "metrics" / "chain_seeds.json"
SUMMARY_METRICS = "metrics/summary.json"
SEED_KEY = "runtime.seed"
SCORED_STAGES = ["seg_eval@pseudo", "seg_eval@gt"]
"""The stages whose metrics the headline figures come from: with their ancestors, every stage but ``summary``."""

RATIO_KEY, RATIO_LABEL = "wsss_fsss_ratio", "WSSS / FSSS ratio"
"""The summary's sixth figure, seg@pseudo ÷ seg@GT: scored on seg_pseudo's split, with its GT flag."""
SEG_PSEUDO = next(figure for figure in FIGURES if figure.key == "seg_pseudo_miou")
PREDICTION_LEVEL = 0.95


def headline_figures() -> list[tuple[str, str, str]]:
    """``(summary key, label, split role)`` of the six headline figures: the summary's ``FIGURES``, then the
    ratio on seg_pseudo's split. The tables over seeds and over machines both list them in this order."""
    return ([(figure.key, figure.label, figure.split_role) for figure in FIGURES]
            + [(RATIO_KEY, RATIO_LABEL, SEG_PSEUDO.split_role)])


def display_scale(key: str) -> tuple[float, int]:
    """How a headline figure is shown: mIoU in points to one decimal, the ratio as is to three."""
    return (1.0, 3) if key == RATIO_KEY else (100.0, 1)


def value_limits(key: str) -> tuple[float, float]:
    """The values a headline figure can take, as stored: an mIoU in [0, 1], the ratio of two mIoUs in [0, inf)."""
    return (0.0, math.inf) if key == RATIO_KEY else (0.0, 1.0)


def prediction_interval(values: list[float], level: float = PREDICTION_LEVEL,
                        limits: tuple[float, float] = (-math.inf, math.inf)) -> tuple[float, float]:
    """Where one more run lands with probability ``level``, if runs are draws from one normal distribution:
    mean ± t(n − 1) · s · √(1 + 1/n), with s the sample std and t Student's quantile at (1 + level) / 2, cut to
    ``limits``, the values the figure can take (an mIoU above 100 % is no place a run can land).

    Why: a few seeds' range is not where the next run lands (three draws span on average half of the
    distribution they come from); another seed, or another CPU's rounding, is one more draw."""
    if len(values) < 2:
        raise ValueError(f"a prediction interval needs at least 2 seeds, got {len(values)}")
    mean, std = mean_and_std(values)
    assert std is not None
    half = float(stats.t.ppf((1 + level) / 2, len(values) - 1)) * std * math.sqrt(1 + 1 / len(values))
    return max(mean - half, limits[0]), min(mean + half, limits[1])


def experiment_name(seed: int) -> str:
    return f"chain-seed{seed}"


def parse_seed(name: str) -> int | None:
    """``3`` for ``chain-seed3``; None for a name this module did not give."""
    match = re.fullmatch(r"chain-seed(\d+)", name)
    return int(match.group(1)) if match else None


def queue_and_run(seeds: tuple[int, ...], poll_s: float = 30.0) -> None:
    """Queue the whole chain at each seed and run the queue with one worker at the chain's own threads (tasks
    that had failed before are not this queue's failures)."""
    earlier_failures = failed_task_ids()
    queued: dict[str, tuple[str, ...]] = {}
    for seed in seeds:
        queued[experiment_name(seed)] = ("-S", f"{SEED_KEY}={seed}")
        queue_experiment(experiment_name(seed), queued[experiment_name(seed)])
        print(f"queued {experiment_name(seed)}: {SEED_KEY}={seed}", flush=True)
    wait_for_queue(jobs=1, poll_s=poll_s, earlier_failures=earlier_failures, queued=queued)


def values_by_figure(committed: dict[str, Any], by_name: dict[str, dict[str, Any]]) -> dict[str, list[float]]:
    """Each headline figure's stored values (mIoU as a fraction), seed 0 (``committed``) first, then the
    ``chain-seed<s>`` experiments by seed; figures no run reports are left out."""
    by_seed = {0: committed}
    for name, summary in by_name.items():
        seed = parse_seed(name)
        if seed is not None and seed > 0:
            by_seed[seed] = summary
    seeds = sorted(by_seed)
    found = {key: [float(by_seed[seed][key]) for seed in seeds if isinstance(by_seed[seed].get(key), (int, float))]
             for key, _, _ in headline_figures()}
    return {key: values for key, values in found.items() if values}


def spread_rows(committed: dict[str, Any], by_name: dict[str, dict[str, Any]],
                gt_flags: dict[str, bool | None]) -> list[dict[str, Any]]:
    """One row per headline figure (the summary's ``FIGURES``, then the ratio): its value at seed 0
    (``committed``) and at every experiment seed, mean ± sample std, and the range (points for mIoU, the ratio
    as is). ``gt_flags``: summary key -> whether a threshold behind that figure was chosen with GT."""
    values_of = values_by_figure(committed, by_name)
    rows = []
    flags = {**gt_flags, RATIO_KEY: gt_flags.get(SEG_PSEUDO.key)}
    for key, label, split in headline_figures():
        values = values_of.get(key)
        if not values:
            continue
        scale, digits = display_scale(key)
        mean, std = mean_and_std(values)
        rows.append({
            "figure": label,
            "split": split,
            "seeds": len(values),
            "per seed": " / ".join(f"{scale * value:.{digits}f}" for value in values),
            "mean": round(scale * mean, digits),
            "± std": None if std is None else round(scale * std, digits),
            "range": f"{scale * min(values):.{digits}f} – {scale * max(values):.{digits}f}",
            f"{PREDICTION_LEVEL:.0%} prediction interval": (
                None if len(values) < 2 else
                " – ".join(f"{scale * bound:.{digits}f}"
                           for bound in prediction_interval(values, limits=value_limits(key)))),
            "threshold_chosen_with_gt": flags.get(key),
        })
    return rows


def spread_description(seeds: list[int], rows: list[dict[str, Any]]) -> str:
    """What the table is: which runs, how they ran, and which rows rest on a GT-chosen threshold."""
    with_gt = [row["figure"] for row in rows if row["threshold_chosen_with_gt"]]
    return (f"Seed 0 is the committed run; seeds {', '.join(map(str, seeds))} are `dvc exp run -S {SEED_KEY}=<s>` "
            "of the whole chain on the same data, one at a time at the chain's own threads "
            "(`python -m bench.chain_seeds run`). Every training stage draws from the seed. mIoU in points, the "
            "ratio as is; mean ± sample std. A run of `make repro` on another machine is one more draw, which a few "
            "seeds' range does not bound; the 95 % prediction interval, mean ± t(n−1) · std · √(1 + 1/n), does "
            "with 95 % probability if runs are normal draws. The next table shows where such runs landed. "
            + (f"Threshold chosen with GT: {', '.join(with_gt)} only." if with_gt else "No threshold chosen with GT."))


def collect() -> Path:
    """Write ``metrics/chain_seeds.json`` from ``dvc exp show --json`` and the committed summary."""
    # an older chain's seeds would be another benchmark's: only the commits whose committed run is this one count
    by_name = experiment_metrics(experiments_of_this_benchmark(SCORED_STAGES), SUMMARY_METRICS)
    seeds = sorted(seed for seed in map(parse_seed, by_name) if seed)
    if not seeds:
        raise RuntimeError("no chain-seed experiment found in `dvc exp show`; run `python -m bench.chain_seeds run`")
    committed = json.loads((REPO / SUMMARY_METRICS).read_text(encoding="utf-8"))
    # The committed metrics files' own flags (the summary's rule), not a copy of which stage picks a threshold.
    gt_flags = {figure.key: gt_flag(read_metrics(REPO / "metrics" / f"{figure.stem}.json")) for figure in FIGURES}
    rows = spread_rows(committed, by_name, gt_flags)
    # "values": the unrounded per-seed figures by summary key, so bench.machine_runs computes the same interval
    # as the rows show (not one from the rounded "per seed" cells); the summary renders only "rows".
    write_json(OUTPUT, {"title": "Headline over training seeds (DVC experiments)",
                        "dataset": committed_dataset(),
                        "description": spread_description(seeds, rows), "rows": rows,
                        "values": values_by_figure(committed, by_name)})
    # Not a dvc.yaml dep of summary (its own experiments run summary before the file exists): re-run summary here
    # so RESULTS.md shows the new spread.
    dvc("repro", "--force", "--single-item", "summary")
    return OUTPUT


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "collect"])
    parser.add_argument("--seeds", type=int, default=2, help="seeds 1..N besides the committed seed 0 (default 2)")
    arguments = parser.parse_args(argv)
    if arguments.command == "run":
        if arguments.seeds < 1:
            parser.error("--seeds: at least 1")
        queue_and_run(tuple(range(1, arguments.seeds + 1)))
    print(f"chain seeds: {collect()}")


if __name__ == "__main__":
    main()

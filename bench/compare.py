"""Your own ``params.yaml`` variant over seeds, beside the baseline run the same way: one command, a paired table.

Why: one run per variant cannot rank two variants that differ by less than a run's own noise (another seed moves
WeakCLIP mIoU by a point, seg mIoU by three or four). The fixed tables of ``bench.ablations`` and
``bench.chain_seeds`` answer that for the variants this repository studies; this module does it for any
``-S key=value`` you want to try. It queues the baseline and the variant as DVC experiments at seeds 1..N (the
same seed key, target, queue and thread count for both), waits, and prints one table per metric: each arm's
mean ± sample std and per-seed values, and the variant's paired difference from the baseline (seed for seed: a
seed moves both arms alike, so pairing removes that shared noise) with its 95 % t-interval. A difference whose
interval holds 0 is reported as not told apart from the noise, whatever its sign.

    python -m bench.compare run NAME -S key=value [-S ...] [--seeds 3] [--target STAGE] [--jobs 2]
    python -m bench.compare show NAME [NAME ...] [--target STAGE] [--metric FILE:KEY ...]

Experiments are ``NAME-s<k>`` and ``cmp-base-<target>-s<k>`` on the current commit (``dvc exp show`` lists
them; ``dvc exp remove`` drops them). ``run`` queues only the experiments that are not there yet, so a second
variant reuses the baseline's runs and ``--seeds 5`` after ``--seeds 3`` adds seeds 4 and 5. The seed key is
``weakclip.train.seed_offset`` for ``--target weakclip_train`` (WeakCLIP's own init, batch order, augmentation
and dropout; the CLIP and CAM seeds stay the committed ones, as the ablation grid does) and ``runtime.seed``
otherwise (every training stage up to the target draws from it); ``--seed-key`` names another.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from scipy import stats

from bench import ablations
from bench.chain_seeds import headline_figures
from flows.dag import read_stage_graph
from weakclip_core.artifacts.atomic import write_json

WEAKCLIP_SEED_KEY = "weakclip.train.seed_offset"
CHAIN_SEED_KEY = "runtime.seed"
WHOLE_CHAIN = "chain"
"""The target label of a comparison over the whole chain (no ``--target``): ``cmp-base-chain-s<k>``."""
CONFIDENCE = 0.95
POLL_S = 15.0
"""Seconds between two looks at ``dvc queue status`` while the experiments run."""
EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class CompareError(Exception):
    """A comparison that cannot run as asked: the message names the key, experiment or metric."""


@dataclass(frozen=True)
class Metric:
    """One figure of the table: a metrics file and a (dotted) key in it."""

    file: str
    key: str

    @property
    def label(self) -> str:
        return f"{self.file}:{self.key}"

    @property
    def in_points(self) -> bool:
        """mIoUs (stored in [0, 1]) are shown in points; any other figure as stored."""
        return "miou" in self.key.lower()


@dataclass(frozen=True)
class Arm:
    """One side of the comparison: its experiment-name stem and its ``-S`` overrides (the seed key's aside)."""

    name: str
    overrides: tuple[str, ...]


def seed_key_for(target: str | None) -> str:
    return WEAKCLIP_SEED_KEY if target == "weakclip_train" else CHAIN_SEED_KEY


def baseline_arm(target: str | None) -> Arm:
    label = re.sub(r"[^A-Za-z0-9._-]", "-", target or WHOLE_CHAIN)
    return Arm(f"cmp-base-{label}", ())


def parse_override(override: str) -> tuple[str, Any]:
    """``"a.b=1.0"`` → ``("a.b", 1.0)``: the value read as YAML, as ``dvc exp run -S`` does."""
    key, separator, value = override.partition("=")
    if not separator or not key.strip():
        raise CompareError(f"-S {override!r}: expected key=value")
    return key.strip(), yaml.safe_load(value)


def check_override_keys(overrides: tuple[str, ...], params: dict[str, Any], seed_key: str) -> None:
    """Every ``-S`` key exists in ``params.yaml`` (a typo would otherwise add a key nothing reads and the
    "variant" would be the baseline), and none is the seed key, which the comparison sets itself."""
    for override in overrides:
        key, _ = parse_override(override)
        if key == seed_key:
            raise CompareError(f"-S {key}: the seed key is set by the comparison (seeds 1..N); drop it")
        node: Any = params
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise CompareError(f"-S {key}: no such key in params.yaml")
            node = node[part]


def nested(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def default_metrics(repo: Path, target: str | None) -> tuple[Metric, ...]:
    """The whole chain: the headline figures of ``metrics/summary.json``. A target stage: the ``miou`` of each
    ``metrics/*.json`` it declares in dvc.yaml (``seg_train@*`` scores nothing: compare at ``seg_eval@*``; the
    training curves under ``dvclive/`` are not results)."""
    if target is None:
        return tuple(Metric("metrics/summary.json", key) for key, _, _ in headline_figures())
    stages = {stage.name: stage for stage in read_stage_graph(repo).stages}
    if target not in stages:
        raise CompareError(f"--target {target}: no such stage in dvc.yaml (stages: {', '.join(sorted(stages))})")
    found = tuple(Metric(path, "miou") for path in stages[target].metrics
                  if path.startswith("metrics/") and path.endswith(".json") and holds_miou(repo / path))
    if not found:
        raise CompareError(f"--target {target}: the stage writes no metrics/*.json with an mIoU; name a figure with "
                           "--metric FILE:KEY or target the stage that scores it")
    return found


def holds_miou(path: Path) -> bool:
    """Whether the workspace's copy of a metrics file has a top-level ``miou`` (absent file: assume it will)."""
    if not path.is_file():
        return True
    try:
        return "miou" in json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return False


def parse_metric(text: str) -> Metric:
    file, separator, key = text.rpartition(":")
    if not separator or not file or not key:
        raise CompareError(f"--metric {text!r}: expected FILE:KEY, e.g. metrics/weakclip.json:miou")
    return Metric(file, key)


@dataclass(frozen=True)
class Run:
    """One finished experiment: its params and the data of every metrics file."""

    params: dict[str, Any]
    metrics: dict[str, dict[str, Any]]


def experiments_of_head(exp_show: list[dict[str, Any]]) -> tuple[dict[str, Run], set[str]]:
    """``({name: Run} of the experiments with results, names of every listed experiment})`` from ``dvc exp show
    --json`` on the current commit. A failed run lists the metrics of the commit it started from: left out."""
    finished: dict[str, Run] = {}
    listed: set[str] = set()
    for baseline in exp_show:
        for experiment in baseline.get("experiments") or []:
            name = experiment.get("name")
            if not name:
                continue
            listed.add(name)
            for revision in experiment.get("revs") or []:
                data = revision.get("data") or {}
                if revision.get("error") or name in finished or not data.get("metrics"):
                    continue
                finished[name] = Run(
                    params=((data.get("params") or {}).get("params.yaml") or {}).get("data") or {},
                    metrics={path: entry["data"] for path, entry in data["metrics"].items()
                             if isinstance(entry, dict) and isinstance(entry.get("data"), dict)})
    return finished, listed


def check_existing_run(name: str, run: Run, overrides: tuple[str, ...], seed_key: str, seed: int) -> None:
    """An experiment already named like one of ours must have been run with our overrides and seed, or the table
    would mix two variants under one name."""
    for key, value in (*map(parse_override, overrides), (seed_key, seed)):
        if nested(run.params, key) != value:
            raise CompareError(f"experiment {name} exists with {key}={nested(run.params, key)!r}, not {value!r}: pick "
                               f"another name, or drop it with `dvc exp remove {name}`")


def flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def overrides_of(finished: dict[str, Run], baseline: Arm, name: str, seed_key: str) -> tuple[str, ...]:
    """``show``: the variant's overrides, read back as the params where its run and the baseline's run at the
    same seed differ (the seed key aside); none when no such pair has finished."""
    for experiment in sorted(finished):
        match = re.fullmatch(re.escape(name) + r"-s(\d+)", experiment)
        reference = finished.get(experiment_name(baseline, int(match.group(1)))) if match else None
        if reference is not None:
            ours, theirs = flat_params(finished[experiment].params), flat_params(reference.params)
            return tuple(f"{key}={json.dumps(ours.get(key))}" for key in sorted(set(ours) | set(theirs))
                         if key != seed_key and ours.get(key) != theirs.get(key))
    return ()


def experiment_name(arm: Arm, seed: int) -> str:
    return f"{arm.name}-s{seed}"


def plan(arms: tuple[Arm, ...], seeds: tuple[int, ...], seed_key: str, finished: dict[str, Run],
         listed: set[str]) -> list[tuple[str, tuple[str, ...]]]:
    """``[(experiment name, its -S overrides)]`` still to run; finished ones are checked, not re-run."""
    to_run = []
    for arm in arms:
        for seed in seeds:
            name = experiment_name(arm, seed)
            if name in finished:
                check_existing_run(name, finished[name], arm.overrides, seed_key, seed)
                continue
            if name in listed:
                raise CompareError(f"experiment {name} is listed without results (failed or still queued): see "
                                   f"`dvc queue logs {name}`; drop it with `dvc exp remove {name}` to run it again")
            to_run.append((name, (*arm.overrides, f"{seed_key}={seed}")))
    return to_run


def queue_and_wait(to_run: list[tuple[str, tuple[str, ...]]], target: str | None, jobs: int, poll_s: float) -> None:
    """Queue each experiment (``dvc exp run --queue``), run the queue with ``jobs`` workers and wait (the
    ablation grid's queue: ``bench.ablations.wait_for_queue``, one thread a run when ``jobs`` > 1)."""
    earlier_failures = ablations.failed_task_ids()
    for name, overrides in to_run:
        arguments = [argument for override in overrides for argument in ("-S", override)]
        ablations.dvc("exp", "run", "--queue", "--name", name, *arguments, *([target] if target else []))
        print(f"queued {name}: {' '.join(overrides)}", flush=True)
    ablations.wait_for_queue(jobs, poll_s, earlier_failures)


def seed_values(finished: dict[str, Run], arm: Arm, metric: Metric) -> dict[int, float]:
    """``{seed: value}`` of ``arm``'s finished experiments that hold the metric."""
    found: dict[int, float] = {}
    pattern = re.compile(re.escape(arm.name) + r"-s(\d+)")
    for name, run in finished.items():
        match = pattern.fullmatch(name)
        value = nested(run.metrics.get(metric.file) or {}, metric.key) if match else None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            found[int(match.group(1))] = float(value)  # type: ignore[union-attr]
    return found


def paired_difference(variant: dict[int, float], baseline: dict[int, float]) -> dict[str, Any] | None:
    """Mean of variant − baseline over the seeds both ran, the differences' sample std, the mean's 95 %
    t-interval (none from one pair), how many pairs the variant leads, and the verdict."""
    shared = sorted(set(variant) & set(baseline))
    if not shared:
        return None
    differences = [variant[seed] - baseline[seed] for seed in shared]
    mean, std = ablations.mean_and_std(differences)
    interval = None
    if std is not None:
        half = stats.t.ppf(0.5 + CONFIDENCE / 2, len(differences) - 1) * std / math.sqrt(len(differences))
        interval = (mean - half, mean + half)
    if interval is None:
        verdict = "one pair: no interval, run more seeds"
    elif interval[0] > 0:
        verdict = "higher"
    elif interval[1] < 0:
        verdict = "lower"
    else:
        verdict = "not told apart from the noise"
    return {"seeds": shared, "mean": mean, "std": std, "interval": interval,
            "ahead": sum(difference > 0 for difference in differences), "verdict": verdict}


def comparison(finished: dict[str, Run], baseline: Arm, variants: tuple[Arm, ...],
               metrics: tuple[Metric, ...]) -> list[dict[str, Any]]:
    """One entry per metric: each arm's seeds, mean and std, and each variant's paired difference."""
    tables = []
    for metric in metrics:
        reference = seed_values(finished, baseline, metric)
        rows = []
        for arm in (baseline, *variants):
            values = seed_values(finished, arm, metric)
            mean, std = ablations.mean_and_std(list(values.values())) if values else (None, None)
            rows.append({"arm": arm.name, "overrides": list(arm.overrides), "values": values, "mean": mean, "std": std,
                         "vs_baseline": None if arm is baseline else paired_difference(values, reference)})
        tables.append({"metric": metric.label, "in_points": metric.in_points, "rows": rows})
    return tables


def render(tables: list[dict[str, Any]], seed_key: str, target: str | None) -> str:
    """The tables as Markdown (mIoU in points)."""
    lines = [f"Seeds: `{seed_key}`; target: {target or 'the whole chain'}; mean ± sample std; 'vs baseline' is the "
             f"mean of the seed-for-seed differences with its {round(100 * CONFIDENCE)} % t-interval."]
    for table in tables:
        scale, digits = (100.0, 1) if table["in_points"] else (1.0, 4)

        def shown(value: float | None) -> str:
            return "—" if value is None else f"{scale * value:.{digits}f}"

        lines += ["", f"**{table['metric']}**" + (" (points)" if table["in_points"] else ""), "",
                  "| experiments | overrides | seeds | mean | ± std | per seed | vs baseline | 95% interval | ahead | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in table["rows"]:
            seeds = sorted(row["values"])
            versus = row["vs_baseline"]
            interval = versus and versus["interval"]
            lines.append("| " + " | ".join([
                f"{row['arm']}-s{{{','.join(map(str, seeds))}}}" if seeds else f"{row['arm']} (no run)",
                " ".join(row["overrides"]) or "baseline",
                str(len(seeds)), shown(row["mean"]), shown(row["std"]),
                " / ".join(shown(row["values"][seed]) for seed in seeds),
                "" if versus is None else f"{'+' if versus['mean'] > 0 else ''}{shown(versus['mean'])}",
                "" if not interval else f"{shown(interval[0])} – {shown(interval[1])}",
                "" if versus is None else f"{versus['ahead']} of {len(versus['seeds'])}",
                "" if versus is None else versus["verdict"]]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "show"])
    parser.add_argument("names", nargs="+", metavar="NAME", help="the variant (run: one; show: one or more)")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="run: a params.yaml override of the variant, as `dvc exp run -S` (repeat for more)")
    parser.add_argument("--seeds", type=int, default=3, help="run: seeds 1..N for both arms (default 3)")
    parser.add_argument("--target", default=None, help="the dvc.yaml stage to run up to (default: the whole chain)")
    parser.add_argument("--seed-key", default=None, help="params key of the seed (default: weakclip.train.seed_offset "
                                                          "for --target weakclip_train, else runtime.seed)")
    parser.add_argument("--metric", action="append", default=[], metavar="FILE:KEY",
                        help="a figure to compare (repeat; default: the target's metrics files' miou, or the "
                             "summary's headline for the whole chain)")
    parser.add_argument("--jobs", type=int, default=2, help="run: experiments at once (dvc queue start -j; default 2)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the tables as JSON")
    arguments = parser.parse_args(argv)
    repo = ablations.REPO
    try:
        if arguments.command == "run" and len(arguments.names) != 1:
            raise CompareError("run: one variant NAME at a time")
        if arguments.command == "run" and not arguments.overrides:
            raise CompareError("run: give the variant's overrides with -S key=value (none: it would be the baseline)")
        if arguments.seeds < 1:
            raise CompareError("--seeds: at least 1")
        seed_key = arguments.seed_key or seed_key_for(arguments.target)
        baseline = baseline_arm(arguments.target)
        for name in arguments.names:
            if not EXPERIMENT_NAME.fullmatch(name) or name.startswith("cmp-base-"):
                raise CompareError(f"NAME {name!r}: letters, digits, '.', '_', '-', not starting with 'cmp-base-'")
        metrics = (tuple(map(parse_metric, arguments.metric)) if arguments.metric
                   else default_metrics(repo, arguments.target))
        finished, listed = experiments_of_head(json.loads(ablations.dvc("exp", "show", "--json")))
        if arguments.command == "run":
            overrides = tuple(arguments.overrides)
            check_override_keys(overrides, yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8")), seed_key)
            arms = (baseline, Arm(arguments.names[0], overrides))
            to_run = plan(arms, tuple(range(1, arguments.seeds + 1)), seed_key, finished, listed)
            if to_run:
                queue_and_wait(to_run, arguments.target, arguments.jobs, poll_s=POLL_S)
                finished, listed = experiments_of_head(json.loads(ablations.dvc("exp", "show", "--json")))
            variants = arms[1:]
        else:
            variants = tuple(Arm(name, overrides_of(finished, baseline, name, seed_key)) for name in arguments.names)
        tables = comparison(finished, baseline, variants, metrics)
        if not any(row["values"] for table in tables for row in table["rows"]):
            raise CompareError(f"no finished experiment {baseline.name}-s<k> or {arguments.names[0]}-s<k> on this "
                               "commit holds " + ", ".join(metric.label for metric in metrics))
    except CompareError as error:
        parser.exit(2, f"compare: error: {error}\n")
    print(render(tables, seed_key, arguments.target))
    if arguments.json is not None:
        write_json(arguments.json, {"seed_key": seed_key, "target": arguments.target, "confidence": CONFIDENCE,
                                    "tables": tables})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

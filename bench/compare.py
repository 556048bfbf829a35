"""Your own ``params.yaml`` variant over seeds, beside the baseline run the same way: one command, a paired table.

Why: one run per variant cannot rank two variants that differ by less than a run's own noise (another seed moves
WeakCLIP mIoU by a point, seg mIoU by three or four). The fixed tables of ``bench.ablations`` and
``bench.chain_seeds`` answer that for the variants this repository studies; this module does it for any
``-S key=value`` you want to try. It queues the baseline and the variant as DVC experiments at seeds 1..N (same
seed key, target and queue, one thread a run), waits, and prints one table per figure: each side's mean ± sample
std and per-seed values, and the variant's paired difference from the baseline (seed for seed: a seed moves both
sides alike, so pairing removes that shared noise) with its 95 % t-interval. "higher" / "lower" only when that
interval leaves 0 out and the pairs' differences vary (one difference in every pair has no spread to judge by,
and its interval no width); "not told apart from the noise" is not "equal" (three seeds see only large effects), and
over several figures at 95 % each, one of them will now and then read "higher" or "lower" by chance.

    python -m bench.compare run NAME -S key=value [-S ...] [--seeds 3] [--target STAGE] [--jobs 2]
    python -m bench.compare show NAME [NAME ...] [--target STAGE] [--metric FILE:KEY ...]

Experiments are ``NAME-s<k>`` (``NAME@<target>-s<k>`` with ``--target``) and ``cmp-base-<target>-s<k>`` on the
commit they were queued on (``dvc exp show`` lists them; ``dvc exp remove`` drops them); an earlier commit's count
too while its params, stages and code up to the target are the current commit's (``experiments_of_this_code``).
``run`` queues only what has not run yet, so a second variant reuses the baseline's runs and ``--seeds 5`` after
``--seeds 3`` adds seeds 4 and 5; a finished run is reused only if every param it ran with is the one asked for now.
The seed key is ``weakclip.train.seed_offset`` for ``--target weakclip_train``
(WeakCLIP's own init, batch order, augmentation and dropout; the CLIP and CAM seeds stay the committed ones, as
the ablation grid's) and ``runtime.seed`` otherwise (every training stage up to the target draws from it);
``--seed-key`` names another. ``-S`` is read with Hydra's override grammar, as ``dvc exp run -S`` reads it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy import stats

from bench import ablations
from bench.ablations import FinishedRun
from bench.chain_seeds import headline_figures
from flows.dag import StageGraph, read_stage_graph
from flows.dvc_cli import CommandFailed
from flows.machines import git, uncommitted_files
from flows.stage_run import flat_params
from weakclip_core.artifacts.atomic import write_json
from weakclip_core.config.params import parse_params_text

WEAKCLIP_SEED_KEY = "weakclip.train.seed_offset"
CHAIN_SEED_KEY = "runtime.seed"
WHOLE_CHAIN = "chain"
"""The target label of a comparison over the whole chain (no ``--target``): ``cmp-base-chain-s<k>``."""
BASELINE_PREFIX = "cmp-base-"
CONFIDENCE = 0.95
POLL_S = 15.0
"""Seconds between two looks at ``dvc queue status`` while the experiments run."""
EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")
"""Names git accepts as a ref's last part (no ``..``, no trailing ``.`` or ``.lock`` issue for these)."""


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


# ----------------------------------------------------------------------------------------------- what to run


def seed_key_for(target: str | None) -> str:
    """The default seed: WeakCLIP's own noise when only WeakCLIP re-trains, the chain's seed otherwise."""
    return WEAKCLIP_SEED_KEY if target == "weakclip_train" else CHAIN_SEED_KEY


def baseline_arm(target: str | None, seed_key: str) -> Arm:
    """The baseline's name: its target, and its seed key when that is not the target's default (the two would be
    different runs)."""
    label = target_label(target)
    if seed_key != seed_key_for(target):
        label += "-" + re.sub(r"[^A-Za-z0-9_-]", "-", seed_key)
    return Arm(BASELINE_PREFIX + label, ())


def target_label(target: str | None) -> str:
    """The target as a part of an experiment name: ``chain`` for the whole chain, ``seg_train@gt`` →
    ``seg_train-gt`` (git takes ``@`` but the variant names use it as the separator)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", target or WHOLE_CHAIN)


def variant_arm(name: str, target: str | None, overrides: tuple[str, ...] = ()) -> Arm:
    """The variant's experiment-name stem: ``NAME`` over the whole chain, ``NAME@<target>`` up to a stage. A run
    made up to one stage leaves every later metric at the commit's values, so reused under another target it
    would pair those stale figures with fresh baseline runs; the target in the name keeps the runs apart."""
    return Arm(name if target is None else f"{name}@{target_label(target)}", overrides)


def parse_overrides(overrides: tuple[str, ...]) -> dict[str, Any]:
    """``{key: value}`` of ``-S`` overrides read as ``dvc exp run -S`` reads them (Hydra's grammar: ``1e-3`` is a
    float, ``yes`` a string). Sweeps (``a=1,2``: DVC would queue one experiment per value) and the ``+``, ``++``,
    ``~`` forms (adding or deleting keys) are refused."""
    from dvc.utils.hydra import to_hydra_overrides
    from hydra.errors import OverrideParseException

    values: dict[str, Any] = {}
    for text in overrides:
        if ":" in text.partition("=")[0]:  # dvc exp run -S's file prefix: only params.yaml is compared here
            file_name, _, rest = text.partition(":")
            if file_name != "params.yaml":
                raise CompareError(f"-S {text}: only params.yaml's keys are compared (not {file_name}'s)")
            text = rest
        try:
            [override] = to_hydra_overrides([text])
        except OverrideParseException as error:
            raise CompareError(f"-S {text}: not a key=value override ({str(error).splitlines()[0]})") from None
        key = override.key_or_group
        if override.is_sweep_override():
            raise CompareError(f"-S {text}: a sweep (one experiment per value); compare one value per NAME")
        if override.is_add() or override.is_force_add() or override.is_delete():
            raise CompareError(f"-S {text}: only key=value of an existing key (no +, ++ or ~)")
        if key in values:
            raise CompareError(f"-S {key}: given twice")
        values[key] = override.value()
    return values


def with_overrides(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Flat params ``base`` with each dotted key of ``values`` set (a mapping value replaces the keys under it)."""
    result = dict(base)
    for key, value in values.items():
        for old in [old for old in result if old == key or old.startswith(key + ".")]:
            del result[old]
        result.update(flat_params(value, key + ".") if isinstance(value, dict) and value else {key: value})
    return result


def has_key(flat: dict[str, Any], key: str) -> bool:
    return any(name == key or name.startswith(key + ".") for name in flat)


def declared_keys(graph: StageGraph) -> set[str]:
    """The params keys the stages of ``graph`` declare in dvc.yaml (``""``: a whole params file)."""
    return {key for stage in graph.stages for key in stage.params}


def check_keys(values: dict[str, Any], flat: dict[str, Any], seed_key: str, graph: StageGraph,
               target: str | None) -> None:
    """Each ``-S`` key and the seed key exist in ``params.yaml`` and are read by a stage the run reaches; the seed
    key is the comparison's own. Otherwise the "variant" would run as the baseline and the table show a 0."""
    declared = declared_keys(graph)

    def read(key: str) -> bool:
        return "" in declared or any(key == name or key.startswith(name + ".") or name.startswith(key + ".")
                                     for name in declared)

    reach = f"--target {target}" if target else "the chain"
    if not has_key(flat, seed_key):
        raise CompareError(f"--seed-key {seed_key}: no such key in params.yaml")
    if not read(seed_key):
        raise CompareError(f"--seed-key {seed_key}: no stage up to {reach} reads it, so no seed would change a run")
    for key in values:
        if key == seed_key:
            raise CompareError(f"-S {key}: the seed key is set by the comparison (seeds 1..N); drop it")
        if not has_key(flat, key):
            raise CompareError(f"-S {key}: no such key in params.yaml")
        if not read(key):
            raise CompareError(f"-S {key}: no stage up to {reach} reads it (dvc.yaml), so the variant would be the "
                               "baseline; pick a later --target")


def check_name(name: str) -> None:
    if not EXPERIMENT_NAME.fullmatch(name) or name.startswith(BASELINE_PREFIX) or name.endswith(".lock"):
        raise CompareError(f"NAME {name!r}: letters, digits, '_', '-', single dots between them, not starting with "
                           f"{BASELINE_PREFIX!r}")


def default_metrics(repo: Path, target: str | None) -> tuple[Metric, ...]:
    """The whole chain: the headline figures of ``metrics/summary.json``. A target stage: the ``miou`` of each
    ``metrics/*.json`` it declares in dvc.yaml (``seg_train@*`` scores nothing: compare at ``seg_eval@*``; the
    training curves under ``dvclive/`` are not results)."""
    if target is None:
        return tuple(Metric("metrics/summary.json", key) for key, _, _ in headline_figures())
    stage = stage_graph(repo, target).by_name()[target]
    found = tuple(Metric(path, "miou") for path in stage.metrics
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


def stage_graph(repo: Path, target: str | None) -> StageGraph:
    """The stages a run reaches: the target and its ancestors (the whole pipeline without one)."""
    graph = read_stage_graph(repo)
    if target is None:
        return graph
    if target not in graph.by_name():
        raise CompareError(f"--target {target}: no such stage in dvc.yaml (stages: {', '.join(graph.names())})")
    return graph.select([target])


def parse_metric(text: str, graph: StageGraph, target: str | None, repo: Path | None = None) -> Metric:
    """``FILE:KEY``, where FILE is written by a stage the run reaches: a later stage's file would hold the
    committed run's figure in every experiment. With ``repo``, KEY (dotted: ``variants.fused.miou``) must also be
    a number in the workspace's copy of FILE, the committed run's, when there is one: a typo would otherwise show
    only after every run had finished."""
    file, separator, key = text.rpartition(":")
    if not separator or not file or not key:
        raise CompareError(f"--metric {text!r}: expected FILE:KEY, e.g. metrics/weakclip.json:miou")
    if not any(file in stage.outs for stage in graph.stages):
        raise CompareError(f"--metric {text}: {file} is not written by a stage up to "
                           f"{'--target ' + target if target else 'the chain'}")
    committed = repo / file if repo is not None else None
    if committed is not None and committed.is_file():
        try:
            data = json.loads(committed.read_text(encoding="utf-8"))
        except ValueError:
            data = None
        value = nested(data, key) if isinstance(data, dict) else None
        if not is_number(value):
            parent = key.rpartition(".")[0]
            around = nested(data, parent) if parent and isinstance(data, dict) else data
            numbers = sorted(name for name, item in (around.items() if isinstance(around, dict) else ())
                             if is_number(item))
            found = "is not a number" if value is not None else "is not there"
            raise CompareError(f"--metric {text}: {key!r} {found} in the committed {file} (numbers "
                               f"{'under ' + repr(parent) if parent else 'at its top level'}: "
                               f"{', '.join(numbers[:12]) or 'none'}{' ...' if len(numbers) > 12 else ''})")
    return Metric(file, key)


def check_clean_workspace(repo: Path) -> None:
    """``dvc exp run --queue`` carries uncommitted changes into every experiment it queues, so runs queued now and
    runs reused later would differ in them: the variant would not be what its name says."""
    files = uncommitted_files(repo)
    if files:
        raise CompareError(f"uncommitted changes in {', '.join(files[:5])}{' ...' if len(files) > 5 else ''}: commit "
                           "or stash them first (every queued experiment would carry them)")


# ----------------------------------------------------------------------------------------------- what ran


def same_code_and_params(repo: Path, rev: str, graph: StageGraph) -> bool:
    """Whether every experiment queued on commit ``rev`` ran what the same ``-S`` runs on HEAD would: ``params.yaml``
    the same, the ``dvc.yaml`` definitions (and ``vars``) of the stages ``graph`` reaches the same, and no
    git-tracked dep of those stages (code, or the ``.dvc`` file of tracked data) changed since. A docs-only or
    unrelated commit keeps them; any change that could move a figure drops them."""
    def read(name: str, at: str) -> Any:
        shown = subprocess.run(["git", "show", f"{at}:{name}"], cwd=repo, capture_output=True, text=True, check=False)
        return parse_params_text(shown.stdout, f"{at}:{name}") if shown.returncode == 0 else None

    if read("params.yaml", rev) != read("params.yaml", "HEAD"):
        return False
    old, new = read("dvc.yaml", rev) or {}, read("dvc.yaml", "HEAD") or {}
    bases = sorted({stage.name.split("@", 1)[0] for stage in graph.stages})
    if old.get("vars") != new.get("vars") or any((old.get("stages") or {}).get(base) != (new.get("stages") or {})
                                                 .get(base) for base in bases):
        return False
    paths = sorted({path for stage in graph.stages for dep in stage.deps if dep not in stage.params_files
                    for path in (dep, f"{dep}.dvc") if not Path(path).is_absolute() and not path.startswith("..")})
    return subprocess.run(["git", "diff", "--quiet", rev, "HEAD", "--", *paths], cwd=repo, capture_output=True,
                          check=False).returncode == 0


def experiments_of_this_code(repo: Path, graph: StageGraph) -> tuple[dict[str, FinishedRun], set[str], list[str]]:
    """``(finished runs, every listed name, the earlier commits whose runs count)``: HEAD's experiments first, then
    those of each earlier commit whose code and params are HEAD's for the stages the comparison reaches
    (``same_code_and_params``), so a commit that moves nothing the runs depend on (docs, another stage) does not
    hide the runs made before it, as plain ``dvc exp show`` would. A name run on several commits counts once: HEAD's,
    else the newest's."""
    head = git(["rev-parse", "HEAD"], repo).strip()
    earlier = [commit for commit in ablations.commits_with_experiments(repo)
               if commit != head and same_code_and_params(repo, commit, graph)]
    finished, listed = ablations.finished_experiments(ablations.experiments_of_commits([head, *earlier]))
    return finished, listed, earlier


def experiment_name(arm: Arm, seed: int) -> str:
    return f"{arm.name}-s{seed}"


def plan(arms: tuple[Arm, ...], seeds: tuple[int, ...], seed_key: str, params: dict[str, Any],
         finished: dict[str, FinishedRun], listed: set[str]) -> list[tuple[str, tuple[str, ...]]]:
    """``[(experiment name, its -S overrides)]`` still to run. A finished experiment of the name is reused only if
    every param it ran with is the one asked for now (``params.yaml`` with the arm's overrides and the seed);
    otherwise, or if it is listed without results, the run stops naming it."""
    base = flat_params(params)
    to_run = []
    unfinished: list[str] = []
    for arm in arms:
        values = parse_overrides(arm.overrides)
        for seed in seeds:
            name = experiment_name(arm, seed)
            if name in finished:
                expected = with_overrides(base, {**values, seed_key: seed})
                ran = flat_params(finished[name].params)
                for key in sorted(set(expected) | set(ran)):
                    if expected.get(key) != ran.get(key):
                        advice = ("drop it" if arm.name.startswith(BASELINE_PREFIX)
                                  else "pick another NAME, or drop it")
                        raise CompareError(f"experiment {name} ran with {key}={shown_value(ran.get(key))}, not "
                                           f"{shown_value(expected.get(key))}: {advice} (`dvc exp remove {name}`)")
                continue
            if name in listed:
                unfinished.append(name)
                continue
            to_run.append((name, (*arm.overrides, f"{seed_key}={seed}")))
    if unfinished:  # all of them in one line (an interrupted run leaves several), with what clears each kind
        raise CompareError(
            f"experiment(s) {' '.join(unfinished)} listed without results (queued, running or failed; an interrupted "
            "run leaves them): see `dvc queue status`; queued and running ones are reused once they finish (`dvc "
            "queue start` runs waiting ones), so run this command again then; failed or killed (`dvc queue kill "
            "<task>`) ones must go first: `dvc exp remove <name> ...`")
    return to_run


def queue_and_wait(to_run: list[tuple[str, tuple[str, ...]]], target: str | None, jobs: int, poll_s: float) -> None:
    """Queue each experiment (``dvc exp run --queue``), run the queue with ``jobs`` workers at one thread a run
    (runs of two calls with other ``--jobs`` then ran alike) and wait (``bench.ablations.wait_for_queue``)."""
    earlier_failures = ablations.failed_task_ids()
    queued: dict[str, tuple[str, ...]] = {}
    for name, overrides in to_run:
        queued[name] = (*(argument for override in overrides for argument in ("-S", override)),
                        *([target] if target else []))
        ablations.queue_experiment(name, queued[name])
        print(f"queued {name}: {' '.join(overrides)}", flush=True)
    ablations.wait_for_queue(jobs, poll_s, earlier_failures, one_thread_each=True, queued=queued)


def runs_of(finished: dict[str, FinishedRun], stem: str) -> dict[str, int]:
    """``{experiment name: seed}`` of the finished ``<stem>-s<seed>`` experiments, in ``finished``'s order."""
    pattern = re.compile(re.escape(stem) + r"-s(\d+)")
    return {name: int(match.group(1)) for name in finished if (match := pattern.fullmatch(name))}


def is_number(value: Any) -> bool:
    """An int or float figure (``True`` is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def seed_values(finished: dict[str, FinishedRun], arm: Arm, metric: Metric, seed_key: str) -> dict[int, float]:
    """``{seed: value}`` of ``arm``'s finished experiments that hold the metric; each run's seed param must be
    its name's (a hand-made ``NAME-s2`` run at another seed would be paired wrongly)."""
    found: dict[int, float] = {}
    for name, seed in runs_of(finished, arm.name).items():
        run = finished[name]
        if nested(run.params, seed_key) != seed:
            # A variant's name does not say its seed key: the usual cause is `show` without the --seed-key of `run`.
            raise CompareError(f"experiment {name} ran with {seed_key}={nested(run.params, seed_key)!r}, not {seed}: "
                               "if it was run with another --seed-key, pass that one (each run's seed key must hold "
                               "the seed its name ends with)")
        value = nested(run.metrics.get(metric.file) or {}, metric.key)
        if is_number(value) and math.isfinite(value):
            found[seed] = float(value)
    return found


def nested(data: dict[str, Any], dotted: str) -> Any:
    """``data["a"]["b"]`` for ``"a.b"``; None where a part is missing."""
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def shown_value(value: Any) -> str:
    """A param value as one writes it after ``-S key=`` (``true``, ``0.001``, ``slow``, ``[1, 2]``)."""
    return value if isinstance(value, str) else json.dumps(value)


def overrides_of(finished: dict[str, FinishedRun], baseline: Arm, name: str, seed_key: str) -> tuple[str, ...] | None:
    """``show``: the variant's overrides, read back as the params where its run and the baseline's run at the
    same seed differ (the seed key aside); None when no such pair has finished."""
    for experiment, seed in sorted(runs_of(finished, name).items()):
        reference = finished.get(experiment_name(baseline, seed))
        if reference is not None:
            ours, theirs = flat_params(finished[experiment].params), flat_params(reference.params)
            return tuple(f"{key}={shown_value(ours[key]) if key in ours else '(absent)'}"
                         for key in sorted(set(ours) | set(theirs))
                         if key != seed_key and ours.get(key) != theirs.get(key))
    return None


# ----------------------------------------------------------------------------------------------- the table


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
    if all(difference == 0 for difference in differences):
        verdict = "identical in every pair"
    elif interval is None:
        verdict = "one pair: no interval, run more seeds"
    elif math.isclose(min(differences), max(differences), rel_tol=1e-9, abs_tol=1e-12):
        # every pair differs by the same amount, up to float rounding (0.8 - 0.7 and 0.7 - 0.6 are not equal
        # floats): a degenerate t-interval, and no spread between the pairs is no evidence that there is none
        verdict = "the same difference in every pair: no spread to judge by, run more seeds"
    elif interval[0] > 0:
        verdict = "higher"
    elif interval[1] < 0:
        verdict = "lower"
    else:
        verdict = "not told apart from the noise"
    return {"seeds": shared, "mean": mean, "std": std, "interval": interval,
            "ahead": sum(difference > 0 for difference in differences), "verdict": verdict}


def comparison(finished: dict[str, FinishedRun], baseline: Arm, variants: tuple[Arm, ...], metrics: tuple[Metric, ...],
               seed_key: str) -> list[dict[str, Any]]:
    """One entry per metric: each arm's seeds, mean and std, and each variant's paired difference."""
    tables = []
    for metric in metrics:
        reference = seed_values(finished, baseline, metric, seed_key)
        rows = []
        for arm in (baseline, *variants):
            values = seed_values(finished, arm, metric, seed_key)
            mean, std = ablations.mean_and_std(list(values.values())) if values else (None, None)
            runs = len(runs_of(finished, arm.name))
            rows.append({"arm": arm.name, "baseline": arm is baseline, "overrides": list(arm.overrides),
                         "runs": runs, "values": values, "mean": mean, "std": std,
                         "vs_baseline": None if arm is baseline else paired_difference(values, reference)})
        tables.append({"metric": metric.label, "in_points": metric.in_points, "rows": rows})
    return tables


def render(tables: list[dict[str, Any]], seed_key: str, target: str | None) -> str:
    """The tables as Markdown (mIoU in points)."""
    lines = [f"Seeds: `{seed_key}`; target: {target or 'the whole chain'}; one thread a run; mean ± sample std; "
             f"'vs baseline' is the mean of the seed-for-seed differences with its {round(100 * CONFIDENCE)} % "
             "t-interval (over the seeds both ran, named where that is not all of the row's)."]
    for table in tables:
        scale, digits = (100.0, 1) if table["in_points"] else (1.0, 4)
        lines += ["", f"**{table['metric']}**" + (" (points)" if table["in_points"] else ""), "",
                  "| experiments | overrides | seeds | mean | ± std | per seed | vs baseline | 95% interval | ahead | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in table["rows"]:
            lines.append(render_row(row, scale, digits))
    return "\n".join(lines)


def render_row(row: dict[str, Any], scale: float, digits: int) -> str:
    def shown(value: float | None) -> str:
        return "—" if value is None else f"{scale * value:.{digits}f}"

    seeds = sorted(row["values"])
    versus = row["vs_baseline"]
    interval = versus and versus["interval"]
    paired = "" if versus is None or versus["seeds"] == seeds else f" (seeds {','.join(map(str, versus['seeds']))})"
    cells = [
        f"{row['arm']}-s{{{','.join(map(str, seeds))}}}" if seeds else
        f"{row['arm']} ({row['runs']} finished run(s), none with a finite number here)" if row.get("runs") else
        f"{row['arm']} (no run)",
        "baseline" if row["baseline"] else " ".join(row["overrides"]) or "?",
        str(len(seeds)), shown(row["mean"]), shown(row["std"]),
        " / ".join(shown(row["values"][seed]) for seed in seeds),
        "" if versus is None else f"{'+' if versus['mean'] > 0 else ''}{shown(versus['mean'])}{paired}",
        "" if not interval else f"{shown(interval[0])} – {shown(interval[1])}",
        "" if versus is None else f"{versus['ahead']} of {len(versus['seeds'])}",
        "" if versus is None else versus["verdict"],
    ]
    return "| " + " | ".join(cells) + " |"


# ----------------------------------------------------------------------------------------------- the command


def run_comparison(arguments: argparse.Namespace, repo: Path) -> tuple[list[dict[str, Any]], str]:
    """Check everything, queue what is missing (``run``), and build the tables; ``CompareError`` otherwise."""
    if arguments.command == "run":
        if len(arguments.names) != 1:
            raise CompareError("run: one variant NAME at a time")
        if not arguments.overrides:
            raise CompareError("run: give the variant's overrides with -S key=value (none: it would be the baseline)")
    elif arguments.overrides or arguments.seeds is not None:
        raise CompareError("show: -S and --seeds belong to run (show reads the experiments that exist)")
    seeds = 3 if arguments.seeds is None else arguments.seeds
    if seeds < 1 or arguments.jobs < 1:
        raise CompareError("--seeds and --jobs: at least 1")
    for name in arguments.names:
        check_name(name)
    seed_key = arguments.seed_key or seed_key_for(arguments.target)
    baseline = baseline_arm(arguments.target, seed_key)
    graph = stage_graph(repo, arguments.target)
    metrics = (tuple(parse_metric(text, graph, arguments.target, repo) for text in arguments.metric)
               if arguments.metric
               else default_metrics(repo, arguments.target))
    params = parse_params_text((repo / "params.yaml").read_text(encoding="utf-8"), repo / "params.yaml") or {}
    finished, listed, earlier = experiments_of_this_code(repo, graph)
    if earlier:
        print(f"also reading the experiments of {len(earlier)} earlier commit(s) whose params.yaml, dvc.yaml stages "
              f"and code up to {'--target ' + arguments.target if arguments.target else 'the whole chain'} are "
              f"this commit's: {', '.join(commit[:12] for commit in earlier)}", flush=True)
    if arguments.command == "run":
        overrides = tuple(arguments.overrides)
        check_keys(parse_overrides(overrides), flat_params(params), seed_key, graph, arguments.target)
        arms = (baseline, variant_arm(arguments.names[0], arguments.target, overrides))
        to_run = plan(arms, tuple(range(1, seeds + 1)), seed_key, params, finished, listed)
        if to_run:
            check_clean_workspace(repo)
            try:
                queue_and_wait(to_run, arguments.target, arguments.jobs, POLL_S)
            except (CommandFailed, RuntimeError) as error:
                raise CompareError(f"the experiments did not all finish: {error}") from None
            finished, listed, _ = experiments_of_this_code(repo, graph)
        variants = arms[1:]
    else:
        stems = [variant_arm(name, arguments.target).name for name in arguments.names]
        missing = [stem for stem in stems if not runs_of(finished, stem)]
        if missing:
            raise CompareError(f"no finished experiment {', '.join(stem + '-s<k>' for stem in missing)} on this "
                               "commit or an earlier one with its code and params (`dvc exp show`; a run made with "
                               "--target shows with the same --target)")
        variants = tuple(Arm(stem, overrides_of(finished, baseline, stem, seed_key) or ()) for stem in stems)
    tables = comparison(finished, baseline, variants, metrics, seed_key)
    if not any(row["values"] for table in tables for row in table["rows"]):
        raise CompareError("no finished experiment of " + ", ".join(arm.name for arm in (baseline, *variants))
                           + " on this commit (or an earlier one with its code and params) holds "
                           + ", ".join(metric.label for metric in metrics))
    return tables, seed_key


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "show"])
    parser.add_argument("names", nargs="+", metavar="NAME", help="the variant (run: one; show: one or more)")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="run: a params.yaml override of the variant, as `dvc exp run -S` (repeat for more)")
    parser.add_argument("--seeds", type=int, default=None, help="run: seeds 1..N for both sides (default 3)")
    parser.add_argument("--target", default=None, help="the dvc.yaml stage to run up to (default: the whole chain)")
    parser.add_argument("--seed-key", default=None, help="params key of the seed (default: weakclip.train.seed_offset "
                                                          "for --target weakclip_train, else runtime.seed)")
    parser.add_argument("--metric", action="append", default=[], metavar="FILE:KEY",
                        help="a figure to compare (repeat; default: the target's metrics files' miou, or the "
                             "summary's headline for the whole chain)")
    parser.add_argument("--jobs", type=int, default=2, help="run: experiments at once, one thread each (default 2)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the tables as JSON")
    arguments = parser.parse_args(argv)
    try:
        tables, seed_key = run_comparison(arguments, ablations.REPO)
    except CompareError as error:
        parser.exit(2, f"compare: error: {error}\n")
    except KeyboardInterrupt:
        parser.exit(130, "compare: interrupted. Experiments already queued stay in DVC's queue and workers already "
                         "started keep running them (`dvc queue status`): `dvc queue start` runs waiting ones, `dvc "
                         "queue stop --kill` and `dvc queue remove --queued` end them; the same command again reuses "
                         "every run that finished\n")
    print(render(tables, seed_key, arguments.target))
    if arguments.json is not None:
        write_json(arguments.json, {"seed_key": seed_key, "target": arguments.target, "confidence": CONFIDENCE,
                                    "tables": tables})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The committed chain re-run on other machines, beside the spread over training seeds.

Why: the committed figures come from one machine. Another CPU's float kernels round differently in the last
bits and training amplifies that, so a user's ``make repro`` lands somewhere else; the headline over seeds
(``bench.chain_seeds``) says where a run *should* land. This module records where one *did*: a clone that ran
the committed code and params on another machine is compared with the committed ``dvc.lock`` (every code and
input dep and every param must match, else the run is refused as another configuration), and its six headline
figures go into ``metrics/machine_runs.json`` beside the committed run, the seeds' range and the seeds' 95 %
prediction interval, each marked inside or outside both. ``pipeline/summary.py`` renders the file after the
headline over seeds.

A few seeds' range is not where one more run lands: three draws span, on average, only half of the
distribution they come from. The prediction interval (Student's t, from the seeds' mean and sample std) is the
spread that one more run, from another seed or another CPU, falls within with 95 % probability if runs are
normal draws; it is wide because three seeds pin down little, and more seeds narrow it.

    python -m bench.machine_runs add CLONE --label "AMD EPYC, 2 cores, 2026-12-02"
    python -m bench.machine_runs render    # re-derive the table from the stored runs and chain_seeds.json

``CLONE`` is the other machine's checkout after its ``make repro`` (its ``dvc.lock`` and
``metrics/summary.json``); ``--label`` names the machine (a run with the same label is replaced). Like
``chain_seeds.json`` the file is no dvc.yaml dep: ``add`` re-runs the ``summary`` stage itself.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import yaml

from bench.ablations import committed_dataset, dvc
from bench.chain_seeds import PREDICTION_LEVEL, display_scale, headline_figures, prediction_interval, value_limits
from pipeline.summary import SummaryError, read_metrics
from weakclip_core.artifacts.atomic import write_json

REPO = Path(__file__).resolve().parents[1]
OUTPUT = Path("metrics") / "machine_runs.json"
CHAIN_SEEDS = Path("metrics") / "chain_seeds.json"
SUMMARY_METRICS = Path("metrics") / "summary.json"
LOCK_FILE = "dvc.lock"
# Every file under it is a result (a stage's metrics or a bench table), never something a run is given.
RESULTS_FOLDER = "metrics/"


class MachineRunError(ValueError):
    """A run that cannot be compared: another configuration, or a file missing or malformed (named)."""


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise MachineRunError(f"{path}: cannot read ({error})") from error
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        raise MachineRunError(f"{path}: not a dvc.lock (no 'stages' mapping)")
    return data


def read_json(path: Path) -> dict[str, Any]:
    """``pipeline.summary.read_metrics`` (one reader of the metrics JSON files), its errors as this module's."""
    try:
        return read_metrics(path)
    except SummaryError as error:
        raise MachineRunError(str(error)) from None


def dep_hash(dep: dict[str, Any]) -> str | None:
    return dep.get("md5") or dep.get("etag") or dep.get("checksum")


def configuration_differences(committed: dict[str, Any], other: dict[str, Any]) -> list[str]:
    """What differs between two ``dvc.lock`` files in what a run is *given*: the stages, their commands, their
    params, and every dep that no stage writes (code, imported inputs). Deps that are another stage's output
    (the files passed along the chain) are the run's own results and may differ; so may the bench tables under
    ``metrics/`` that the ``summary`` stage renders (``metrics/ablations_*.json``, written by ``bench.ablations``
    from other runs): they are results too, and a table refreshed after a run must not make that run another
    configuration."""
    produced = {out["path"] for lock in (committed, other) for stage in lock["stages"].values()
                for out in stage.get("outs", [])}

    def is_result(path: str) -> bool:
        return path.startswith(RESULTS_FOLDER) or any(
            path == out or path.startswith(out.rstrip("/") + "/") for out in produced)

    differences = []
    stages = sorted(set(committed["stages"]) | set(other["stages"]))
    for name in stages:
        mine, theirs = committed["stages"].get(name), other["stages"].get(name)
        if mine is None or theirs is None:
            differences.append(f"stage {name}: only in the {'other run' if mine is None else 'committed'} dvc.lock")
            continue
        if mine.get("cmd") != theirs.get("cmd"):
            differences.append(f"stage {name}: command {theirs.get('cmd')!r}, committed {mine.get('cmd')!r}")
        if mine.get("params") != theirs.get("params"):
            differences.append(f"stage {name}: params differ")
        inputs = [{dep["path"]: dep_hash(dep) for dep in stage.get("deps", []) if not is_result(dep["path"])}
                  for stage in (mine, theirs)]
        for path in sorted(set(inputs[0]) | set(inputs[1])):
            if inputs[0].get(path) != inputs[1].get(path):
                differences.append(f"stage {name}: dep {path} differs")
    return differences


def seed_values(row: dict[str, Any], path: Path) -> list[float]:
    """The per-seed values of one ``chain_seeds.json`` row (its ``per seed`` cell, ``"45.6 / 42.0 / 38.1"``)."""
    cell = row.get("per seed")
    if not isinstance(cell, str) or not re.fullmatch(r"\s*-?\d+(\.\d+)?(\s*/\s*-?\d+(\.\d+)?)*\s*", cell):
        raise MachineRunError(f"{path}: row {row.get('figure')!r} has no 'per seed' values like '45.6 / 42.0'")
    return [float(value) for value in cell.split("/")]


def placement(shown: float, seeds_range: tuple[float, float], interval: tuple[float, float]) -> str:
    """Where a run's (rounded) value sits against the seeds' range and their prediction interval (also rounded)."""
    def side(low: float, high: float) -> str | None:
        return None if low <= shown <= high else "below" if shown < low else "above"
    in_range, in_interval = side(*seeds_range), side(*interval)
    if in_range is None:
        return "inside the seeds' range"
    if in_interval is None:
        return f"inside the prediction interval, {in_range} the seeds' range"
    return f"outside: {in_interval} the prediction interval"


def comparison_rows(committed: dict[str, Any], chain_seeds: dict[str, Any], runs: list[dict[str, Any]],
                    chain_seeds_path: Path = REPO / CHAIN_SEEDS) -> list[dict[str, Any]]:
    """One row per headline figure: the committed value, the seeds' range and 95 % prediction interval, and each
    machine run's value placed against both (compared at the table's rounding: points to 0.1, the ratio to
    0.001)."""
    seeds_by_figure = {row.get("figure"): row for row in chain_seeds.get("rows", [])}
    rows = []
    for key, label, split in headline_figures():
        scale, digits = display_scale(key)
        if not isinstance(committed.get(key), (int, float)):
            continue
        row: dict[str, Any] = {"figure": label, "split": split,
                               "committed run": f"{scale * committed[key]:.{digits}f}"}
        seeds_row = seeds_by_figure.get(label)
        stored = chain_seeds.get("values", {}).get(key)
        bounds: tuple[tuple[float, float], tuple[float, float]] | None = None
        if stored or seeds_row is not None:
            # The unrounded values chain_seeds stores (so the interval matches its table's), else, in a file
            # written before it stored them, the row's shown values (then the limits are in shown units too).
            values, factor = (stored, scale) if stored else (seed_values(seeds_row, chain_seeds_path), 1.0)
            lowest, highest = value_limits(key)
            try:
                interval = prediction_interval(values, limits=(lowest * scale / factor, highest * scale / factor))
            except ValueError as error:
                raise MachineRunError(f"{chain_seeds_path}: row {label!r}: {error}") from None
            low, high = (round(factor * bound, digits) for bound in interval)
            least, most = (round(factor * value, digits) for value in (min(values), max(values)))
            bounds = (least, most), (low, high)
            row[f"training seeds ({len(values)} runs)"] = f"{least:.{digits}f} – {most:.{digits}f}"
            row[f"{PREDICTION_LEVEL:.0%} prediction interval"] = f"{low:.{digits}f} – {high:.{digits}f}"
        for run in runs:
            value = run["summary"].get(key)
            if not isinstance(value, (int, float)):
                row[run["label"]] = None
                continue
            shown = round(scale * value, digits)
            where = "" if bounds is None else f" ({placement(shown, *bounds)})"
            row[run["label"]] = f"{shown:.{digits}f}{where}"
        rows.append(row)
    return rows


def description(runs: list[dict[str, Any]]) -> str:
    return ("The committed code and params (every code and input dep and param of `dvc.lock` identical) re-run by "
            "a fresh clone's `make repro` on another machine (`python -m bench.machine_runs add`), beside the "
            "committed run and the training seeds (\"Headline over seeds\"): their range, and their 95 % "
            "prediction interval, mean ± t(n−1) · std · √(1 + 1/n), the spread one more run falls within with 95 % "
            "probability if runs are normal draws (wide: three seeds pin down little; more seeds narrow it). The "
            "interval, not the seeds' range, is the spread to expect from a run elsewhere. mIoU in points, the ratio as is; "
            f"{len(runs)} other machine run(s). A run outside the seeds' range but inside the interval is "
            "an ordinary draw that three seeds did not happen to span; one outside the interval would mean "
            "another CPU moves the chain more than another seed does. The CAM row's threshold is chosen with GT, "
            "as in the headline; no other figure's is.")


def add_run(clone: Path, label: str, repo: Path = REPO) -> Path:
    """Check ``clone`` ran the committed configuration, then add (or replace) its figures under ``label``."""
    differences = configuration_differences(read_yaml(repo / LOCK_FILE), read_yaml(clone / LOCK_FILE))
    if differences:
        shown = "\n  ".join(differences[:10])
        raise MachineRunError(f"{clone / LOCK_FILE}: not the committed configuration ({len(differences)} "
                              f"difference(s)):\n  {shown}")
    summary = read_json(clone / SUMMARY_METRICS)
    output = repo / OUTPUT
    runs = [run for run in (read_json(output).get("runs", []) if output.is_file() else []) if run["label"] != label]
    runs.append({"label": label, "summary": {key: summary.get(key) for key, _, _ in headline_figures()}})
    return write_table(runs, repo)


def render(repo: Path = REPO) -> Path:
    """Re-derive the table from the runs already stored (after a new ``chain_seeds.json``, or new code)."""
    output = repo / OUTPUT
    if not output.is_file():
        raise MachineRunError(f"{output}: no machine runs recorded yet (python -m bench.machine_runs add CLONE)")
    runs = read_json(output).get("runs")
    if not isinstance(runs, list) or not runs:
        raise MachineRunError(f"{output}: no 'runs' list")
    return write_table(runs, repo)


def write_table(runs: list[dict[str, Any]], repo: Path) -> Path:
    output, chain_seeds_path = repo / OUTPUT, repo / CHAIN_SEEDS
    chain_seeds = read_json(chain_seeds_path) if chain_seeds_path.is_file() else {}
    committed = read_json(repo / SUMMARY_METRICS)
    write_json(output, {"title": "The committed chain on other machines", "dataset": committed_dataset(repo),
                        "description": description(runs),
                        "runs": runs, "rows": comparison_rows(committed, chain_seeds, runs, chain_seeds_path)})
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["add", "render"])
    parser.add_argument("clone", type=Path, nargs="?", help="add: the other machine's checkout, after its make repro")
    parser.add_argument("--label", help="add: names the machine, e.g. 'AMD EPYC, 2 cores, 2026-12-02'")
    arguments = parser.parse_args(argv)
    if arguments.command == "add" and (arguments.clone is None or not arguments.label):
        parser.error("add: give the CLONE and --label")
    try:
        path = add_run(arguments.clone, arguments.label) if arguments.command == "add" else render()
    except MachineRunError as error:
        raise SystemExit(f"bench.machine_runs: {error}") from None
    # Not a dvc.yaml dep of summary (like chain_seeds.json): re-run summary so RESULTS.md shows the runs.
    dvc("repro", "--force", "--single-item", "summary")
    print(f"machine runs: {path}")


if __name__ == "__main__":
    main()

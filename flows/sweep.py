"""The ``sweep`` flow: ``dvc exp run -S ...`` variants, each in its own clone, gathered in one table.

Each variant clones the repository (``git clone <repo_dir>``: the clone's git
remote ``origin`` is the repository itself), pulls the baseline's outputs from
the shared DVC remote so only what the overrides touch re-runs, runs the
experiment, and ``dvc exp push``es it: the experiment's git ref goes to the
origin and its outputs to the DVC remote. Afterwards ``dvc exp show`` in the
origin (or in any clone after ``dvc exp pull origin <name>``) compares them in
one table. Clones live in temporary folders, so variants on one machine never
share a workspace, and variants on several machines need only the git path and
the DVC remote.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.futures import wait

from flows.dvc_cli import capture_command, dvc_command, run_command


@task(task_run_name="variant {experiment_name}")
def run_variant(origin: str, experiment_name: str, overrides: list[str], remote: str | None) -> str:
    """Clone ``origin``, run one experiment with ``-S`` ``overrides``, push it back; returns its name."""
    logger = get_run_logger()
    with tempfile.TemporaryDirectory(prefix=f"weakclip-sweep-{experiment_name}-") as scratch:
        clone = Path(scratch) / "repo"
        run_command(["git", "clone", "--quiet", origin, str(clone)], Path(scratch), logger)
        if remote:
            run_command(dvc_command("pull", "--remote", remote, "--allow-missing"), clone, logger)
        set_params = [arg for override in overrides for arg in ("--set-param", override)]
        run_command(dvc_command("exp", "run", "--name", experiment_name, *set_params), clone, logger)
        cache_args = ["--remote", remote] if remote else ["--no-cache"]
        run_command(dvc_command("exp", "push", *cache_args, "origin", experiment_name), clone, logger)
    return experiment_name


def experiment_rows(exp_show_json: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """Flatten ``dvc exp show --json`` into one row per named experiment: its params and metrics."""
    rows: list[dict[str, Any]] = []
    for baseline in exp_show_json:
        for experiment in baseline.get("experiments") or []:
            name = experiment.get("name")
            if name not in names:
                continue
            for revision in experiment.get("revs", []):
                data = revision.get("data") or {}
                row: dict[str, Any] = {"experiment": name, "rev": (revision.get("rev") or "")[:7]}
                for section in ("params", "metrics"):
                    for path, content in (data.get(section) or {}).items():
                        for key, value in ((content or {}).get("data") or {}).items():
                            if not isinstance(value, dict):
                                row[f"{path}:{key}"] = value
                rows.append(row)
    return rows


@flow(name="sweep", log_prints=True)
def sweep(
    repo_dir: str,
    variants: dict[str, list[str]],
    remote: str | None = None,
    max_parallel: int = 2,
) -> list[dict[str, Any]]:
    """Run ``variants`` (experiment name → ``-S`` overrides such as ``["seg.lr=0.01"]``) of the committed HEAD.

    Returns the rows of the comparison table (also published as a table artifact).
    Uncommitted changes in ``repo_dir`` are not part of the sweep: clones see only commits.
    """
    origin = str(Path(repo_dir).resolve())
    names = list(variants)
    futures = []
    for index, (name, overrides) in enumerate(variants.items()):
        if index >= max_parallel:
            wait(futures[index - max_parallel : index - max_parallel + 1])
        futures.append(run_variant.submit(origin, name, overrides, remote))
    wait(futures)
    failed = [name for name, future in zip(names, futures) if not future.state.is_completed()]
    if failed:
        raise RuntimeError(f"sweep variants {failed} failed (see their task runs' logs)")
    shown = capture_command(dvc_command("exp", "show", "--json"), Path(origin))
    rows = experiment_rows(json.loads(shown), names)
    create_table_artifact(table=rows, key="sweep-experiments", description=f"dvc exp show for {names}")
    return rows


def main() -> None:
    """``python -m flows.sweep --variant NAME KEY=VALUE [KEY=VALUE ...] ...``: run a sweep in this process."""
    import argparse

    parser = argparse.ArgumentParser(description="Run dvc exp variants in clones and push them back.")
    parser.add_argument("--repo-dir", default=".", help="the git + DVC repository (its HEAD is the baseline)")
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        required=True,
        metavar="NAME_OR_OVERRIDE",
        help="an experiment name then its -S overrides, e.g. --variant lr-small seg.lr=0.001 (repeatable)",
    )
    parser.add_argument("--remote", default=None, help="DVC remote shared by the clones")
    parser.add_argument("--max-parallel", type=int, default=2)
    args = parser.parse_args()
    variants = {name: overrides for name, *overrides in args.variant}
    rows = sweep(repo_dir=args.repo_dir, variants=variants, remote=args.remote, max_parallel=args.max_parallel)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

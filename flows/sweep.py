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
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.futures import wait

from flows.dag import read_stage_graph
from flows.dvc_cli import capture_command, dvc_command, run_command
from flows.machines import project_clone, shown_paths, uncommitted_files, untracked_in_deps
from flows.stage_run import flat_params


def remote_options(repo: Path) -> dict[str, dict[str, Any]]:
    """Every DVC remote of ``repo`` (``.dvc/config`` and ``config.local`` merged) with its options as DVC resolves
    them: a relative path (``url = ../../remote``, a keyfile) made absolute against its config file's folder."""
    from dvc.repo import Repo

    with Repo(str(repo)) as opened:
        return {name: dict(options) for name, options in opened.config["remote"].items()}


def pin_remotes_to_origin(origin: Path, clone: Path, logger: Any) -> None:
    """Make every remote option of ``clone`` that resolves elsewhere than in ``origin`` resolve as there (``dvc
    remote modify --local``). A relative path resolves against each clone's own ``.dvc`` folder, so a variant's
    clone in a temporary folder would pull from and push to a remote inside that folder, deleted with it: every
    stage re-ran and the outputs were lost while ``dvc exp push`` reported success."""
    wanted, have = remote_options(origin), remote_options(clone)
    for name, options in wanted.items():
        for key, value in options.items():
            if isinstance(value, str) and have.get(name, {}).get(key) != value:
                run_command(dvc_command("remote", "modify", "--local", name, key, value), clone, logger)


@task(task_run_name="variant {experiment_name}")
def run_variant(origin: str, experiment_name: str, overrides: list[str], remote: str | None) -> str:
    """Clone ``origin``, run one experiment with ``-S`` ``overrides``, push it back; returns its name."""
    logger = get_run_logger()
    with tempfile.TemporaryDirectory(prefix=f"weakclip-sweep-{experiment_name}-") as scratch:
        clone = Path(scratch) / "repo"
        run_command(["git", "clone", "--quiet", origin, str(clone)], Path(scratch), logger)
        local_config = Path(origin) / ".dvc" / "config.local"  # not in git: an SSH remote's keyfile, a password
        if local_config.is_file():
            shutil.copy2(local_config, clone / ".dvc" / "config.local")
        pin_remotes_to_origin(Path(origin), clone, logger)
        if remote:
            run_command(dvc_command("pull", "--remote", remote, "--allow-missing"), clone, logger)
        set_params = [arg for override in overrides for arg in ("--set-param", override)]
        run_command(dvc_command("exp", "run", "--name", experiment_name, *set_params), clone, logger)
        cache_args = ["--remote", remote] if remote else ["--no-cache"]
        run_command(dvc_command("exp", "push", *cache_args, "origin", experiment_name), clone, logger)
    return experiment_name


def override_columns(variants: dict[str, list[str]]) -> set[str]:
    """The params columns a sweep varies: ``params.yaml:seg.train.lr`` for ``seg.train.lr=…`` / ``+…``, and
    ``file.yaml:key`` for ``file.yaml:key=…`` (``~key`` removes a key: no column)."""
    columns = set()
    for overrides in variants.values():
        for override in overrides:
            target = override.partition("=")[0]
            path, colon, key = target.rpartition(":")
            key = key.lstrip("+")
            if key and not key.startswith("~"):
                columns.add(f"{path if colon else 'params.yaml'}:{key}")
    return columns


def experiment_rows(exp_show_json: list[dict[str, Any]], names: list[str],
                    param_columns: set[str] | None = None) -> list[dict[str, Any]]:
    """One row per named experiment that finished (its executor reports success, or is gone, and it has no
    error): ``param_columns`` of its params (all of them when ``None``) and every metric, nested keys joined
    by dots (``metrics/seg_pseudo.json:per_class.cat``). Queued, running and failed experiments list the
    baseline's metrics as if they were theirs: they are left out."""
    rows: list[dict[str, Any]] = []
    for baseline in exp_show_json:
        for experiment in baseline.get("experiments") or []:
            name = experiment.get("name")
            executor = experiment.get("executor")
            if name not in names or (executor is not None and executor.get("state") != "success"):
                continue
            for revision in (experiment.get("revs") or [])[:1]:
                if revision.get("error"):
                    continue
                data = revision.get("data") or {}
                row: dict[str, Any] = {"experiment": name, "rev": (revision.get("rev") or "")[:7]}
                for section in ("params", "metrics"):
                    for path, content in (data.get(section) or {}).items():
                        for key, value in flat_params((content or {}).get("data") or {}).items():
                            column = f"{path}:{key}"
                            if section == "metrics" or param_columns is None or column in param_columns:
                                row[column] = value
                rows.append(row)
    return rows


def check_sweep_can_start(origin: Path, names: list[str], max_parallel: int) -> str:
    """Refuse (ValueError, one line) what would run the wrong thing or report another run's figures; returns the
    baseline commit. A dirty workspace: clones see only commits, so an edit would silently not be swept. A name
    that is already an experiment of the baseline: ``dvc exp push`` keeps the old one ("diverged", exit 0) and
    the table showed the old run's figures as the new variant's."""
    if max_parallel < 1:
        raise ValueError(f"max_parallel must be at least 1, got {max_parallel}")
    dirty = uncommitted_files(origin) + untracked_in_deps(origin, read_stage_graph(origin))
    if dirty:
        raise ValueError(f"{origin}: uncommitted changes in {shown_paths(dirty)}: the sweep runs the committed HEAD "
                         "in clones, so they would not be part of it; commit (or stash) them first")
    existing = set(capture_command(dvc_command("exp", "list", "--name-only"), origin).split())
    taken = sorted(existing & set(names))
    if taken:
        raise ValueError(f"experiment(s) {taken} already exist on {origin}'s HEAD: remove them (dvc exp remove "
                         f"{' '.join(taken)}) or name the variants otherwise")
    return capture_command(["git", "rev-parse", "HEAD"], origin).strip()


@flow(name="sweep", log_prints=True)
def sweep(
    repo_dir: str,
    variants: dict[str, list[str]],
    remote: str | None = None,
    max_parallel: int = 2,
) -> list[dict[str, Any]]:
    """Run ``variants`` (experiment name → ``-S`` overrides such as ``["seg.train.lr=0.01"]``) of the committed HEAD.

    Returns the rows of the comparison table (also published as a table artifact): each variant's overridden
    params and its metrics. ``remote``: the DVC remote the clones pull the baseline's outputs from and push
    theirs to; ``None`` uses the project's default remote, if it has one (without any, every stage re-runs in
    each clone and only the metrics, in git, outlive it). A dirty workspace or a name already taken is refused.
    """
    logger = get_run_logger()
    origin = project_clone(repo_dir)
    names = list(variants)
    baseline = check_sweep_can_start(origin, names, max_parallel)
    if remote is None:
        default = subprocess.run(dvc_command("remote", "default"), cwd=origin, capture_output=True, text=True)
        remote = default.stdout.strip() or None if default.returncode == 0 else None
        if remote is None:
            logger.warning("no --remote and no default DVC remote: each clone re-runs every stage, and its outputs "
                           "are deleted with it (only the metrics, in git, come back)")
    futures = []
    for index, (name, overrides) in enumerate(variants.items()):
        if index >= max_parallel:
            wait(futures[index - max_parallel : index - max_parallel + 1])
        futures.append(run_variant.submit(str(origin), name, overrides, remote))
    wait(futures)
    failed = [name for name, future in zip(names, futures) if not future.state.is_completed()]
    if failed:
        raise RuntimeError(f"sweep variants {failed} failed (see their task runs' logs)")
    shown = capture_command(dvc_command("exp", "show", "--json", "--rev", baseline), origin)
    rows = experiment_rows(json.loads(shown), names, override_columns(variants))
    missing = sorted(set(names) - {row["experiment"] for row in rows})
    if missing:
        raise RuntimeError(f"sweep variants {missing} ran but dvc exp show in {origin} lists no finished "
                           f"experiment of that name on {baseline[:12]}")
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
        help="an experiment name then its -S overrides, e.g. --variant lr-small seg.train.lr=0.001 (repeatable)",
    )
    parser.add_argument("--remote", default=None, help="DVC remote shared by the clones")
    parser.add_argument("--max-parallel", type=int, default=2)
    args = parser.parse_args()
    names = [name for name, *_ in args.variant]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        parser.error(f"--variant names must differ; given more than once: {', '.join(repeated)}")
    variants = {name: overrides for name, *overrides in args.variant}
    rows = sweep(repo_dir=str(Path(args.repo_dir).resolve()), variants=variants, remote=args.remote,
                 max_parallel=args.max_parallel)  # the folder given (default: here), whatever $WEAKCLIP_PROJECT says
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

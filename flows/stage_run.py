"""One stage's work: pull what it needs, ``dvc repro --single-item`` it, push what it made, publish its metrics.

Shared by the in-process task of the ``chain`` flow and by the ``stage`` flow
that the work pools run, so both paths do exactly the same thing.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from flows.dag import StageSpec
from flows.dvc_cli import dvc_command, run_command


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"miou": 0.5, "per_class": {"cat": 0.4}}`` → ``{"miou": 0.5, "per_class.cat": 0.4}`` (numbers only)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, prefix=f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def flat_params(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` of a nested mapping, any value kept (a list or an empty mapping is one value): params
    and metrics as ``dvc exp show`` holds them (``flatten_metrics`` keeps the numbers only)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def artifact_key(stage_name: str, suffix: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes: ``seg_train@gt`` → ``seg-train-gt-metrics``."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"{stage_name}-{suffix}".lower()).strip("-")
    return slug


def read_stage_metrics(stage: StageSpec, repo_dir: Path) -> dict[str, dict[str, float]]:
    """Each JSON metrics file the stage declares and that exists, flattened: ``{path: {name: value}}``."""
    found: dict[str, dict[str, float]] = {}
    for relative in stage.metrics:
        path = repo_dir / relative
        if path.suffix == ".json" and path.is_file():
            try:
                found[relative] = flatten_metrics(json.loads(path.read_text()))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: metrics file of stage {stage.name!r} is not valid JSON ({error})") from error
    return found


def publish_stage_metrics(stage: StageSpec, metrics_by_file: dict[str, dict[str, float]]) -> None:
    """One Prefect table artifact per stage (rows: file, metric, value), shown in the flow run's UI."""
    from prefect.artifacts import create_table_artifact

    rows = [
        {"file": path, "metric": name, "value": round(value, 6)}
        for path, metrics in metrics_by_file.items()
        for name, value in sorted(metrics.items())
    ]
    if rows:
        create_table_artifact(
            table=rows,
            key=artifact_key(stage.name, "metrics"),
            description=f"Metrics of DVC stage `{stage.name}` ({', '.join(metrics_by_file)})",
        )


def execute_stage(
    stage: StageSpec,
    repo_dir: Path,
    logger: logging.Logger | logging.LoggerAdapter,
    remote: str | None = None,
) -> dict[str, dict[str, float]]:
    """Run one stage through DVC and return its metrics.

    With ``remote``, the outputs of the upstream stages are pulled from that DVC
    remote first (a fresh machine then has the stage's deps) and the stage's own
    outputs are pushed after, so the next machine can pull them.
    """
    if remote and stage.upstream:
        run_command(dvc_command("pull", "--remote", remote, *stage.upstream), repo_dir, logger)
    run_command(dvc_command("repro", "--single-item", stage.name), repo_dir, logger)
    if remote:
        run_command(dvc_command("push", "--remote", remote, stage.name), repo_dir, logger)
    metrics_by_file = read_stage_metrics(stage, repo_dir)
    publish_stage_metrics(stage, metrics_by_file)
    return metrics_by_file

"""Two ``dvc exp run`` experiments queued and run at once (``dvc queue start -j 2``) on a tiny git + DVC
project whose stages are the project's own ``prepare`` and ``cam_train`` on the tiny params.

Checked: each experiment's metrics equal those of a direct, separate run of ``cam_train`` with that
experiment's params (so neither saw the other's params, data or checkpoints), the two differ, and the
workspace (params, lock, outputs, git tree) is byte for byte what it was before the queue ran.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.cam_train import CamTrainPaths, train_cam_model
from tiny_chain import params_text, stage_env, tiny_params
from weakclip_core.config import params_from_dict

DVC = [sys.executable, "-m", "dvc"]
EXPERIMENTS = {"more-epochs": {"cam": {"train": {"epochs": 3}}}, "other-seed": {"runtime": {"seed": 1}}}
SETS = {"more-epochs": ["cam.train.epochs=3"], "other-seed": ["runtime.seed=1"]}
METRICS = "dvclive/cam_train/metrics.json"

DVC_YAML = {"stages": {
    "prepare": {"cmd": "python -m pipeline.prepare --params params.yaml --no-progress",
                "params": ["dataset"], "outs": ["data/prepared/tiny", "reports/dataset_preview.png"]},
    "cam_train": {"cmd": "python -m pipeline.cam_train --params params.yaml",
                  "deps": ["data/prepared/tiny"], "params": ["cam.arch", "cam.train", "runtime"],
                  "outs": ["artifacts/mctformer"], "metrics": [{METRICS: {"cache": False}}]},
}}


def tool_env() -> dict[str, str]:
    return dict(stage_env(), GIT_AUTHOR_NAME="faults test", GIT_AUTHOR_EMAIL="faults@example.invalid",
                GIT_COMMITTER_NAME="faults test", GIT_COMMITTER_EMAIL="faults@example.invalid")


def run(command: list[str], cwd: Path) -> str:
    completed = subprocess.run(command, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    assert completed.returncode == 0, f"{command} failed:\n{completed.stdout}\n{completed.stderr}"
    return completed.stdout


def workspace_files(repo: Path) -> dict[str, bytes]:
    """Every file of the workspace except DVC's and git's own state."""
    return {str(path.relative_to(repo)): path.read_bytes() for path in sorted(repo.rglob("*"))
            if path.is_file() and not path.relative_to(repo).parts[0] in (".git", ".dvc")}


def direct_metrics(repo: Path, name: str, folder: Path) -> dict:
    """dvclive's metrics of ``cam_train`` run directly (no DVC) with the experiment's params."""
    shutil.copytree(repo / "data", folder / "data")
    plain = tiny_params(overrides=EXPERIMENTS[name])
    plain["dataset"]["prepared_dir"] = str(folder / "data/prepared/tiny")
    threads = torch.get_num_threads()
    try:
        train_cam_model(params_from_dict(plain), CamTrainPaths(model=folder / "model.pt", live_dir=folder / "live",
                                                               checkpoint_root=folder / "checkpoints"),
                        show_progress=False)
    finally:
        torch.set_num_threads(threads)
    return json.loads((folder / "live" / "metrics.json").read_text())


@pytest.mark.slow
def test_two_queued_experiments_run_in_parallel_without_interfering(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "params.yaml").write_text(params_text(tiny_params()))
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (repo / ".gitignore").write_text("/checkpoints\n")
    run(["git", "init", "--quiet"], repo)
    run([*DVC, "init", "--quiet"], repo)
    run(["git", "add", "--all"], repo)
    run(["git", "commit", "--quiet", "-m", "tiny project"], repo)  # dvclive needs a commit to exist
    run([*DVC, "repro", "--quiet"], repo)
    run(["git", "add", "--all"], repo)
    run(["git", "commit", "--quiet", "-m", "baseline"], repo)
    before = workspace_files(repo)

    for name, assignments in SETS.items():
        run([*DVC, "exp", "run", "--queue", "--name", name, *[f"--set-param={a}" for a in assignments]], repo)
    run([*DVC, "queue", "start", "--jobs", "2"], repo)
    deadline = time.monotonic() + 420
    while True:
        status = run([*DVC, "queue", "status"], repo)
        rows = [line for line in status.splitlines() if any(name in line for name in SETS)]
        if len(rows) == 2 and all("Success" in row for row in rows):
            break
        assert not any("Failed" in row for row in rows), status + run([*DVC, "queue", "logs", rows[0].split()[0]], repo)
        assert time.monotonic() < deadline, status
        time.sleep(3)

    shown = json.loads(run([*DVC, "exp", "show", "--json"], repo))
    experiments = {exp["name"]: exp["revs"][0]["data"] for entry in shown for exp in entry.get("experiments") or []}
    assert set(SETS) <= set(experiments)
    measured = {name: experiments[name]["metrics"][METRICS]["data"] for name in SETS}
    assert experiments["more-epochs"]["params"]["params.yaml"]["data"]["cam"]["train"]["epochs"] == 3
    assert experiments["other-seed"]["params"]["params.yaml"]["data"]["runtime"]["seed"] == 1
    # 12 images / batch 4 = 3 steps per epoch; dvclive's step is the last epoch index.
    assert measured["more-epochs"]["step"] == 2 and measured["other-seed"]["step"] == 1
    for name in SETS:
        assert measured[name] == direct_metrics(repo, name, tmp_path / f"direct_{name}"), name
    assert measured["more-epochs"] != measured["other-seed"]

    assert workspace_files(repo) == before
    assert run(["git", "status", "--porcelain"], repo).strip() == ""
    baseline_metrics = json.loads((repo / METRICS).read_text())
    assert baseline_metrics["step"] == 1 and baseline_metrics not in measured.values()

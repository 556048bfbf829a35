"""A tiny DVC project (git + DVC, five one-line stages) to try the flows, pools and remotes on.

The real chain takes minutes per stage; this one takes a second, so
docs/ORCHESTRATION.md's walkthrough and the flow tests run against it. Its
stage names follow the real chain where it matters: ``cam_train`` is in the GPU
table, so it goes to the GPU pool, and it records the ``CUDA_VISIBLE_DEVICES``
it saw in ``env/cam_train.txt`` (not a DVC output, so the lock does not
depend on the GPU it ran on).

Shape: ``prepare → cam_train → {eval_a, eval_b} → summary``.

``python -m flows.demo /tmp/demo`` writes it there (the folder must not exist).
"""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml


def _one_liner(code: str) -> str:
    return f'python -c "{code}"'


def demo_stages() -> dict[str, dict[str, Any]]:
    """The demo's ``dvc.yaml`` stages (cmds are python one-liners that write their outputs)."""
    return {
        "prepare": {
            "cmd": _one_liner(
                "import pathlib; pathlib.Path('data').mkdir(exist_ok=True); "
                "pathlib.Path('data/raw.txt').write_text(' '.join(str(i) for i in range(10)))"
            ),
            "outs": ["data/raw.txt"],
        },
        "cam_train": {
            "cmd": _one_liner(
                "import json, os, pathlib; pathlib.Path('artifacts').mkdir(exist_ok=True); pathlib.Path('env').mkdir(exist_ok=True); "
                "pathlib.Path('env/cam_train.txt').write_text(os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')); "
                "values = [int(v) for v in pathlib.Path('data/raw.txt').read_text().split()]; "
                "pathlib.Path('artifacts/model.txt').write_text(str(sum(values))); "
                "live = pathlib.Path('dvclive/cam_train'); (live / 'plots/metrics').mkdir(parents=True, exist_ok=True); "
                "(live / 'metrics.json').write_text(json.dumps({'loss': 1 / len(values), 'step': 1})); "
                "(live / 'plots/metrics/loss.tsv').write_text('step\\tloss\\n0\\t1.0\\n1\\t' + str(1 / len(values)) + '\\n')"
            ),
            "deps": ["data/raw.txt"],
            "outs": ["artifacts/model.txt"],
            # Like the real cam_train's dvclive logs: cache: false metrics and plots (DVC never pushes them).
            "metrics": [{"dvclive/cam_train/metrics.json": {"cache": False}}],
            "plots": [{"dvclive/cam_train/plots/metrics": {"cache": False, "x": "step"}}],
        },
        "eval_a": {
            "cmd": _one_liner(
                "import json, pathlib, yaml; scale = yaml.safe_load(open('params.yaml'))['scale']; "
                "pathlib.Path('metrics').mkdir(exist_ok=True); "
                "total = int(pathlib.Path('artifacts/model.txt').read_text()); "
                "json.dump({'miou': round(scale * total / 100, 4), 'per_class': {'cat': 0.25}}, open('metrics/eval_a.json', 'w'))"
            ),
            "deps": ["artifacts/model.txt"],
            "params": ["scale"],
            "metrics": [{"metrics/eval_a.json": {"cache": False}}],
        },
        "eval_b": {
            "cmd": _one_liner(
                "import json, pathlib; pathlib.Path('metrics').mkdir(exist_ok=True); "
                "total = int(pathlib.Path('artifacts/model.txt').read_text()); "
                "json.dump({'miou': round(total / 90, 4)}, open('metrics/eval_b.json', 'w'))"
            ),
            "deps": ["artifacts/model.txt"],
            "metrics": [{"metrics/eval_b.json": {"cache": False}}],
        },
        "summary": {
            "cmd": _one_liner(
                "import json, pathlib; a = json.load(open('metrics/eval_a.json')); b = json.load(open('metrics/eval_b.json')); "
                "pathlib.Path('reports').mkdir(exist_ok=True); "
                "pathlib.Path('reports/summary.txt').write_text(str(a['miou'] + b['miou'])); "
                "json.dump({'summary_miou': round((a['miou'] + b['miou']) / 2, 4)}, open('metrics/summary.json', 'w'))"
            ),
            "deps": ["metrics/eval_a.json", "metrics/eval_b.json"],
            "outs": ["reports/summary.txt"],
            "metrics": [{"metrics/summary.json": {"cache": False}}],
        },
    }


def _run(command: list[str], cwd: Path) -> None:
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True, text=True)


def write_demo_project(
    root: Path,
    stages: dict[str, dict[str, Any]] | None = None,
    remote_dir: Path | None = None,
    exist_ok: bool = False,
) -> Path:
    """Create ``root`` as a git + DVC repository holding ``stages`` (default: the demo), committed.

    ``remote_dir``: a local folder made the default DVC remote ``shared`` (committed in ``.dvc/config``).
    ``exist_ok``: ``root`` may exist already (with files to commit along, e.g. a code folder a stage depends on).
    """
    import sys

    root = Path(root)
    root.mkdir(parents=True, exist_ok=exist_ok)
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "--quiet", "--initial-branch", "main"], root)
    _run(["git", "config", "user.email", "flows@example.invalid"], root)
    _run(["git", "config", "user.name", "weakclip flows"], root)
    _run([*dvc, "init", "--quiet"], root)
    if remote_dir is not None:
        Path(remote_dir).mkdir(parents=True, exist_ok=True)
        _run([*dvc, "remote", "add", "--default", "shared", str(Path(remote_dir).resolve())], root)
    (root / "params.yaml").write_text("scale: 0.5\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages or demo_stages()}, sort_keys=False, width=1000))
    (root / ".gitignore").write_text("/env/\n")
    _run(["git", "add", "--all"], root)
    _run(["git", "commit", "--quiet", "-m", "demo pipeline"], root)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder to create (must not exist)")
    parser.add_argument("--remote-dir", type=Path, default=None, help="local folder to use as the DVC remote 'shared'")
    args = parser.parse_args()
    print(write_demo_project(args.root, remote_dir=args.remote_dir))


if __name__ == "__main__":
    main()

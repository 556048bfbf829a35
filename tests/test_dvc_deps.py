"""dvc.yaml's code deps: every library module a stage's code imports is a dep of that stage.

DVC re-runs a stage only when one of its declared deps changes, so a module that shapes a stage's outputs
(augmentation, sampling order, LR schedule, metrics, overlays) but is missing from ``deps`` lets an edit
to it leave stale artifacts marked "up to date". The reference here is the stage's own source, read with
``ast``: each ``weakclip_core`` module that ``pipeline/<stage>.py`` imports must be covered by a dep (the
file itself or a folder above it). Modules that cannot change what a stage writes are exempt, each with
its reason in ``PLUMBING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

PLUMBING = {
    "weakclip_core/config": "parameter values reach the stage through dvc.yaml's `params:`, tracked by value",
    "weakclip_core/artifacts/atomic.py": "how a file is written (temporary name, rename), not what it holds",
    "weakclip_core/errors.py": "error messages and exit codes",
    "weakclip_core/runtime/processes.py": "worker process lifetime",
}


def module_file(dotted: str) -> str:
    """``weakclip_core.data.layout`` → ``weakclip_core/data/layout.py`` (a package → its folder)."""
    relative = dotted.replace(".", "/")
    if (REPO_ROOT / f"{relative}.py").is_file():
        return f"{relative}.py"
    if (REPO_ROOT / relative / "__init__.py").is_file():
        return relative
    raise AssertionError(f"{dotted}: no such module under {REPO_ROOT}")


def imported_library_files(source: Path) -> set[str]:
    """The ``weakclip_core`` modules (as repo paths) that ``source`` imports at any level of its code."""
    found = set()
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(module_file(name) for name in names if name.split(".")[0] == "weakclip_core")
    return found


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def stage_code_and_deps() -> list[tuple[str, Path, list[str]]]:
    """``(stage, pipeline/<module>.py, deps)`` for each stage, read from dvc.yaml's ``cmd`` and ``deps``."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    rows = []
    for name, stage in stages.items():
        body = stage.get("do", stage)
        module = body["cmd"].split("-m ", 1)[1].split()[0]
        rows.append((name, REPO_ROOT / module_file(module), [str(dep) for dep in body["deps"]]))
    return rows


def test_module_resolution_and_coverage_against_known_answers() -> None:
    assert module_file("weakclip_core.data.layout") == "weakclip_core/data/layout.py"
    assert module_file("weakclip_core.models.weakclip") == "weakclip_core/models/weakclip"
    assert covered("weakclip_core/data/layout.py", ["weakclip_core/data"])
    assert covered("weakclip_core/data/layout.py", ["weakclip_core/data/layout.py"])
    assert not covered("weakclip_core/data/layout.py", ["weakclip_core/data/layout"])
    assert not covered("weakclip_core/evaluation/metrics.py", ["weakclip_core/metrics_extra.py", "weakclip_core/met"])


def test_imports_are_read_from_the_source(tmp_path: Path) -> None:
    source = tmp_path / "stage.py"
    source.write_text("import os\nimport weakclip_core.evaluation.metrics\n"
                      "from weakclip_core.data.layout import PreparedDataset\n"
                      "from weakclip_core.data import transforms\n"
                      "def later():\n    from weakclip_core.method.crf import dense_crf\n")
    assert imported_library_files(source) == {"weakclip_core/evaluation/metrics.py", "weakclip_core/data/layout.py",
                                              "weakclip_core/data", "weakclip_core/method/crf.py"}


@pytest.mark.parametrize("stage, code, deps", stage_code_and_deps(), ids=lambda value: str(value)[:40])
def test_every_imported_library_module_is_a_dep(stage: str, code: Path, deps: list[str]) -> None:
    assert covered(str(code.relative_to(REPO_ROOT)), deps), f"dvc.yaml: stage {stage} does not list its own code"
    missing = sorted(path for path in imported_library_files(code)
                     if not covered(path, deps) and not covered(path, list(PLUMBING)))
    assert not missing, f"dvc.yaml: stage {stage} imports {missing} but does not list them under deps"

"""dvc.yaml's code deps: every library module (and shared ``pipeline/_*.py`` helper) a stage's code imports is a
dep of that stage.

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
    "pipeline/_locks.py": "work locks: whether a run may start, not what it writes",
}


# Names of the shared stage helpers (pipeline/_*.py) that cannot change what a stage writes: importing
# only these does not make the helper a dep. Any other name (pipeline._stage.LiveLog writes and trims the
# dvclive logs, which are stage outputs) does.
PLUMBING_NAMES = {
    "pipeline._stage": {
        "StageSpec": "the stage's command-line description",
        "run_stage": "argument parsing, the torchrun relaunch, the summary line, timings/ (not a DVC output)",
        "run_stage_cli": "one-line errors and exit codes",
        "require_input": "the message naming the stage to run when an input is missing",
        "MissingInputError": "that message's exception",
        "launch_stage": "the torchrun relaunch (runtime.launcher, a declared param)",
    },
}


def module_file(dotted: str) -> str:
    """``weakclip_core.data.layout`` → ``weakclip_core/data/layout.py`` (a package → its folder)."""
    relative = dotted.replace(".", "/")
    if (REPO_ROOT / f"{relative}.py").is_file():
        return f"{relative}.py"
    if (REPO_ROOT / relative / "__init__.py").is_file():
        return relative
    raise AssertionError(f"{dotted}: no such module under {REPO_ROOT}")


def is_shared_helper(dotted: str) -> bool:
    """``pipeline._stage``: a module of ``pipeline/`` that is not a stage (its name starts with ``_``)."""
    parts = dotted.split(".")
    return len(parts) == 2 and parts[0] == "pipeline" and parts[1].startswith("_")


def imported_library_files(source: Path) -> set[str]:
    """The ``weakclip_core`` modules and the shared ``pipeline/_*.py`` helpers (unless only their plumbing
    names are imported) that ``source`` imports at any level of its code, as repo paths."""
    found = set()
    for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if is_shared_helper(node.module) and all(alias.name in PLUMBING_NAMES.get(node.module, {})
                                                     for alias in node.names):
                names = []
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found.update(module_file(name) for name in names
                     if name.split(".")[0] == "weakclip_core" or is_shared_helper(name))
    return found


def imported_closure(source: Path) -> set[str]:
    """Every library module (and shared helper) ``source`` reaches through imports, transitively: the stage's
    training loop lives in ``weakclip_core/training/loop.py``, which the stage imports only through the
    trainer it calls. Plumbing modules are not followed (they cannot change what a stage writes)."""
    found: set[str] = set()
    pending = [source]
    while pending:
        for path in imported_library_files(pending.pop()):
            if path in found or covered(path, list(PLUMBING)):
                continue
            found.add(path)
            target = REPO_ROOT / path
            pending += sorted(target.rglob("*.py")) if target.is_dir() else [target]
    return found


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


def stage_code_and(field: str) -> list[tuple[str, Path, list[str]]]:
    """``(stage, pipeline/<module>.py, its deps or params)`` for each stage, read from dvc.yaml's ``cmd`` and
    ``field``."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    rows = []
    for name, stage in stages.items():
        body = stage.get("do", stage)
        module = body["cmd"].split("-m ", 1)[1].split()[0]
        rows.append((name, REPO_ROOT / module_file(module), [str(entry) for entry in body.get(field, [])]))
    return rows


def stage_code_and_deps() -> list[tuple[str, Path, list[str]]]:
    return stage_code_and("deps")


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


def test_shared_stage_helpers_count_unless_only_plumbing_is_imported(tmp_path: Path) -> None:
    plumbing = tmp_path / "plumbing.py"
    plumbing.write_text("from pipeline._stage import StageSpec, run_stage, run_stage_cli\n")
    assert imported_library_files(plumbing) == set()
    live = tmp_path / "live.py"
    live.write_text("from pipeline._stage import LiveLog, StageSpec\n")
    assert imported_library_files(live) == {"pipeline/_stage.py"}


@pytest.mark.parametrize("stage, code, deps", stage_code_and_deps(), ids=lambda value: str(value)[:40])
def test_every_imported_library_module_is_a_dep(stage: str, code: Path, deps: list[str]) -> None:
    assert covered(str(code.relative_to(REPO_ROOT)), deps), f"dvc.yaml: stage {stage} does not list its own code"
    missing = sorted(path for path in imported_closure(code)
                     if not covered(path, deps) and not covered(path, list(PLUMBING)))
    assert not missing, f"dvc.yaml: stage {stage} imports {missing} (directly or through other modules) but does not list them under deps"


@pytest.mark.parametrize("stage, code, deps", stage_code_and_deps(), ids=lambda value: str(value)[:40])
def test_a_stage_that_loads_the_trained_weakclip_lists_the_clip_it_adapts(stage: str, code: Path,
                                                                          deps: list[str]) -> None:
    """``load_weakclip_model`` rebuilds WeakCLIP over the CLIP artifact whose path its model file records (only the
    trainable parts are in the file). ``pseudo_masks`` did not list that artifact: ``dvc repro`` still had it from
    ``clip``, but a pool worker pulls only a stage's listed deps, so on a GPU clone that had not run
    ``weakclip_train`` the stage stopped with "the CLIP that ... adapts does not exist"."""
    calls = [node for node in ast.walk(ast.parse(code.read_text(), filename=str(code)))
             if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None))
             == "load_weakclip_model"]
    if not calls:
        return
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    clip_artifact = next(str(out) for out in stages["clip"]["outs"] if not str(out).startswith("metrics/"))
    assert clip_artifact == "artifacts/clip"
    assert clip_artifact in deps, f"dvc.yaml: stage {stage} loads the trained WeakCLIP but does not list {clip_artifact}"


@pytest.mark.parametrize("stage, code, deps", stage_code_and_deps(), ids=lambda value: str(value)[:40])
def test_a_stage_that_opens_the_prepared_dataset_lists_its_labels_and_splits(stage: str, code: Path,
                                                                             deps: list[str]) -> None:
    """``PreparedDataset.open`` reads ``labels.json`` (class names, image labels) and a stage's ``split()`` reads
    ``ImageSets/Segmentation/<split>.txt``. ``seg_train`` listed only ``JPEGImages`` and its masks: a pool worker
    pulls only listed deps, so on a fresh clone it stopped on the missing labels file, and on a reused one it
    trained on an earlier run's labels and split beside this run's images; ``dvc repro`` did not re-run it for a
    changed label file either. (``prepare`` writes the folder, so it is not its input.)"""
    if stage == "prepare" or "PreparedDataset.open" not in code.read_text():
        return
    for needed in ("${dataset.prepared_dir}/labels.json", "${dataset.prepared_dir}/ImageSets/Segmentation/train.txt"):
        assert covered(needed, deps), f"dvc.yaml: stage {stage} opens the prepared dataset but does not list {needed}"


def test_summary_lists_every_metrics_file_its_globs_find() -> None:
    """``pipeline/summary.py`` renders every ``metrics/<pattern>`` file its ``glob`` calls find (the ablation
    tables). DVC has no glob deps, so each such file in the repository must be listed under ``summary``'s
    deps, or a new or changed table would leave docs/RESULTS.md "up to date" without it."""
    source = REPO_ROOT / "pipeline" / "summary.py"
    patterns = [node.args[0].value for node in ast.walk(ast.parse(source.read_text(), filename=str(source)))
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "glob"
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)]
    deps = {name: deps for name, _, deps in stage_code_and_deps()}["summary"]
    found = sorted(f"metrics/{path.name}" for pattern in patterns for path in (REPO_ROOT / "metrics").glob(pattern))
    assert [path for path in found if path not in deps] == []



@pytest.mark.parametrize("stage, code, params", stage_code_and("params"), ids=lambda value: str(value)[:40])
def test_a_stage_tracks_runtime_precision_only_if_its_code_reads_it(stage: str, code: Path, params: list[str]) -> None:
    """``runtime.precision: bf16`` is WeakCLIP's autocast; a stage that declared all of ``runtime`` (cam_train,
    the clip stage, seg_train did) was re-run by ``dvc repro`` when a user switched it on: 60 MCTformer
    epochs on the presets' GPUs, and everything downstream, for a setting the stage never reads."""
    tracks = "runtime" in params or "runtime.precision" in params
    reads = "runtime.precision" in code.read_text()
    assert tracks == reads, (f"dvc.yaml: stage {stage} {'tracks' if tracks else 'does not track'} runtime.precision "
                             f"but {code.name} {'reads' if reads else 'never reads'} it")

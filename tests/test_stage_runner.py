"""The stage runner every stage shares (pipeline/_stage.py): one-line errors naming the params key, the
library's errors under one base class, wall times kept out of DVC's metrics, one entry point per stage."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
import sys
from pathlib import Path

import pytest
import yaml

import weakclip_core
from pipeline._stage import StageSpec, params_key, run_stage
from weakclip_core.config.schema import ConfigError
from weakclip_core.errors import InputError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "faults"))
import tiny_chain  # noqa: E402


def test_params_key_names_the_key_of_a_refused_value() -> None:
    with pytest.raises(ConfigError, match=r"^cam\.arch: image_size 30 is not a multiple of patch_size 8$"):
        with params_key("cam.arch"):
            raise ValueError("image_size 30 is not a multiple of patch_size 8")
    with pytest.raises(KeyError):  # not a refused value: a bug keeps its own type and traceback
        with params_key("cam.arch"):
            raise KeyError("model")


def test_every_library_error_class_shares_the_input_error_base() -> None:
    """Every exception class the library defines derives from ``InputError``: the runner needs one name."""
    error_classes = []
    for module_info in pkgutil.walk_packages(weakclip_core.__path__, "weakclip_core."):
        module = importlib.import_module(module_info.name)
        error_classes += [value for value in vars(module).values()
                          if inspect.isclass(value) and issubclass(value, BaseException)
                          and value.__module__ == module.__name__]
    assert len(error_classes) >= 8, error_classes
    assert [cls.__name__ for cls in error_classes if not issubclass(cls, InputError)] == []


def test_the_library_never_tells_the_user_to_run_dvc() -> None:
    """What to run next is the app's business (``require_input``): the library is not tied to DVC."""
    offenders = [str(path.relative_to(REPO)) for path in (REPO / "weakclip_core").rglob("*.py")
                 if "dvc repro" in path.read_text()]
    assert offenders == []


def test_run_stage_prints_the_summary_and_keeps_the_wall_time_out_of_the_metrics(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch,
                                                                               capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("runtime:\n  seed: 3\n")
    seen = {}

    def work(params, args, context):  # noqa: ANN001, ANN202 (the StageSpec signature)
        seen["seed"], seen["context"], seen["source"] = params.runtime.seed, context, args.source
        return "toy: done"

    spec = StageSpec(name="toy", module="pipeline.toy", description="a toy stage", run=work,
                     add_arguments=lambda parser: parser.add_argument("--source", default="gt"),
                     label=lambda args: f"toy@{args.source}")
    assert run_stage(spec, ["--source", "pseudo"]) is None
    assert seen == {"seed": 3, "context": None, "source": "pseudo"}
    assert capsys.readouterr().out == "toy: done\n"
    timing = json.loads((tmp_path / "timings" / "toy@pseudo.json").read_text())
    assert timing["stage"] == "toy@pseudo" and 0 <= timing["wall_s"] < 60 and timing["finished_at"]


def test_every_stage_main_is_the_shared_entry_point() -> None:
    """Each stage module's ``main`` is one call of ``run_stage`` (no stage parses arguments itself)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    modules = {stage.get("do", stage)["cmd"].split("-m ", 1)[1].split()[0] for stage in stages.values()}
    assert len(modules) == 9
    for module in sorted(modules):
        tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
        main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
        body = [node for node in main.body if not isinstance(node, ast.Expr)]  # the docstring aside
        assert len(body) == 1 and "run_stage(" in ast.unparse(body[0]), f"{module}.main: {ast.unparse(main)}"
        assert "ArgumentParser" not in ast.unparse(tree), module


@pytest.mark.slow
def test_a_model_the_params_cannot_build_is_one_line_naming_the_key(tmp_path: Path) -> None:
    project = tiny_chain.write_project(tmp_path / "project", overrides={"cam": {"arch": {"image_size": 30}}})
    tiny_chain.run_stage(project, "prepare")
    completed = tiny_chain.run_stage(project, "cam_train", check=False)
    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines() == [
        "cam_train: error: cam.arch: image_size 30 is not a multiple of patch_size 8"]
    assert not (project / "artifacts" / "mctformer").exists()

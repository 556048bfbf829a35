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
        parsers = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
                   and ast.unparse(node.func).endswith("ArgumentParser")]
        assert parsers == [], f"{module} builds its own argument parser"


@pytest.mark.slow
def test_a_model_the_params_cannot_build_is_one_line_naming_the_key(tmp_path: Path) -> None:
    project = tiny_chain.write_project(tmp_path / "project")
    tiny_chain.run_stage(project, "prepare")
    # now refused when params load (every stage reading params would say it), before cam_train builds anything
    tiny_chain.write_project(project, overrides={"cam": {"arch": {"image_size": 30}}})
    completed = tiny_chain.run_stage(project, "cam_train", check=False)
    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines() == [
        "cam_train: error: params.yaml: cam.arch.image_size: 30 is not a multiple of patch_size 8"]
    assert not (project / "artifacts" / "mctformer").exists()


# --------------------------------------------------------------------------- work locks and interrupts

import os  # noqa: E402
import time  # noqa: E402

def _spec(name: str, run, add_arguments=None) -> StageSpec:  # noqa: ANN001
    return StageSpec(name=name, module=f"pipeline.{name}", description=name, run=run, add_arguments=add_arguments)


def test_a_second_run_of_a_stage_is_refused_while_the_first_holds_the_lock(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock is an ``flock`` per open file: a run started inside another one meets it like another process."""
    from pipeline._locks import StageBusyError  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    (tmp_path / "params.yaml").write_text("runtime:\n  seed: 3\n")
    inner_errors: list[str] = []

    def inner(params, args, context):  # noqa: ANN001
        return "inner ran"

    def outer(params, args, context):  # noqa: ANN001
        with pytest.raises(StageBusyError) as caught:
            run_stage(_spec("toy", inner), ["--params", "params.yaml"])
        inner_errors.append(str(caught.value))
        assert run_stage(_spec("other", inner), ["--params", "params.yaml"]) is None  # another stage: free
        return None

    run_stage(_spec("toy", outer), ["--params", "params.yaml"])
    assert inner_errors == [f"another run of toy is in progress in this workspace (pid {os.getpid()}); wait for it "
                            "to finish or stop it (the lock is checkpoints/.locks/toy.lock; it is released when "
                            "that process ends)"]
    assert run_stage(_spec("toy", inner), ["--params", "params.yaml"]) is None  # released after the run


def test_shard_locks_let_shards_run_together_but_not_twice_nor_under_a_merge(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline._locks import StageBusyError, shard_locks, stage_lock  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)

    def locks(index: int, count: int, merge: bool = False) -> list[tuple[str, bool]]:
        return shard_locks("pm", index, count, merge)

    assert locks(0, 1) == [("pm", True)] and locks(1, 2, merge=True) == [("pm", True)]
    assert locks(1, 2) == [("pm", False), ("pm.shard-1-of-2", True)]
    with stage_lock(locks(0, 2)):
        with stage_lock(locks(1, 2)):
            pass  # another shard runs at once
        with pytest.raises(StageBusyError, match=r"another run of pm --shard 0/2 is in progress"):
            with stage_lock(locks(0, 2)):
                pass
        with pytest.raises(StageBusyError, match=rf"another run of pm is in progress in this workspace "
                                                 rf"\(shard 0/2 \(pid {os.getpid()}\)\)"):
            with stage_lock(locks(0, 1, merge=True)):
                pass
    with stage_lock(locks(0, 1, merge=True)):
        with pytest.raises(StageBusyError, match=r"another run of pm is in progress"):
            with stage_lock(locks(1, 2)):
                pass


def test_torchrun_workers_take_no_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the launching process holds the lock; its torchrun workers (LOCAL_RANK set) run under it."""
    from pipeline._locks import stage_lock  # noqa: PLC0415

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("runtime:\n  seed: 3\n")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with stage_lock([("toy", True)]):
        assert run_stage(_spec("toy", lambda params, args, context: None), ["--params", "params.yaml"]) is None


def test_interrupts_become_one_line_and_128_plus_the_signal(monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    """In-process: a signal to this process during ``main`` is one line and exit 128 + signum; the previous
    handlers (pytest's) are back afterwards; a ``finally`` in the stage ran."""
    import signal  # noqa: PLC0415

    from pipeline._stage import run_stage_cli  # noqa: PLC0415

    monkeypatch.delenv("WEAKCLIP_TRACEBACK", raising=False)
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    cleaned: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        def main() -> None:
            try:
                os.kill(os.getpid(), signum)
                for _ in range(1000):
                    time.sleep(0.01)  # the handler raises here
            finally:
                cleaned.append(signum)

        with pytest.raises(SystemExit) as exited:
            run_stage_cli(main, "toy")
        assert exited.value.code == 128 + signum
        assert capsys.readouterr().err == f"toy: interrupted ({signal.Signals(signum).name})\n"
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert cleaned == [signal.SIGINT, signal.SIGTERM]


def _record_not_trained_in_step(folder: str, start: object, rounds: int) -> None:
    """One DDP rank's part: ``rounds`` times, wait for the other ranks, then write the "not trained" outputs."""
    from pipeline._stage import record_not_trained

    root = Path(folder)
    for _ in range(rounds):
        start.wait(timeout=30)  # type: ignore[attr-defined]  (a rank that died breaks it for the others)
        record_not_trained(root / "artifacts" / "model.pt", root / "dvclive", "not trained: cam.source is 'none'")


def test_every_rank_writing_the_not_trained_outputs_at_once_succeeds(tmp_path: Path) -> None:
    """A preset with ``launcher: torchrun`` and nothing to train (``cam.source: npy_folder``, ``seg_train@gt`` on
    label-only data) has every rank write the "not trained" outputs together; one rank's ``mkdir`` of the plots
    folder met another's, and the stage failed at random (FileExistsError / FileNotFoundError). Four processes,
    30 rounds, started together each round: every one ends cleanly and the outputs are those of one writer."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    start = context.Barrier(4)
    (tmp_path / "artifacts").mkdir()
    (tmp_path / "dvclive" / "plots" / "metrics").mkdir(parents=True)
    (tmp_path / "dvclive" / "plots" / "metrics" / "loss.tsv").write_text("step\tloss\n0\t1.0\n")  # an old run's
    ranks = [context.Process(target=_record_not_trained_in_step, args=(str(tmp_path), start, 30)) for _ in range(4)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout=120)
    assert [rank.exitcode for rank in ranks] == [0, 0, 0, 0]
    record = {"trained": False, "not_trained": "not trained: cam.source is 'none'"}
    assert json.loads((tmp_path / "artifacts" / "not_trained.json").read_text()) == record
    assert json.loads((tmp_path / "dvclive" / "metrics.json").read_text()) == record
    # one header-only table, not an empty folder: git carries these cache: false plots and holds no empty folder
    assert [path.name for path in (tmp_path / "dvclive" / "plots" / "metrics").iterdir()] == ["not_trained.tsv"]
    assert (tmp_path / "dvclive" / "plots" / "metrics" / "not_trained.tsv").read_text() == "step\n"
    assert sorted(p.name for p in (tmp_path / "artifacts").iterdir()) == ["not_trained.json"]

"""The training stages under ``runtime.launcher: torchrun``: 2 Gloo processes on CPU end with the weights of
``launcher: none`` at the same global batch (the single-process run is the reference), rank 0 alone writes,
and a global batch that does not divide over ``runtime.nproc`` stops the stage with one line naming both keys.

Each stage runs as ``python -m pipeline.<stage>`` in a tiny project folder (tests/faults/tiny_chain.py); with
``launcher: torchrun`` its ``main()`` relaunches itself under torchrun. Per-process random streams cannot
reproduce one process's draws, so the configs switch the stochastic layers off: ``cam.arch.drop_path: 0``,
and for DeepLabV3+ (whose ASPP has a fixed ``Dropout(0.5)``) a ``sitecustomize`` in the test's PYTHONPATH
makes ``nn.Dropout`` the identity in every process, torchrun's workers included.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "faults"))
from tiny_chain import run_stage, stage_env, write_project  # noqa: E402

NO_DROP_PATH = {"cam": {"arch": {"drop_path": 0.0}}}
TWO_PROCESSES = {"launcher": "torchrun", "nproc": 2}
NO_DROPOUT_SITE = "import torch.nn\ntorch.nn.Dropout.forward = lambda self, input: input\n"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project with the prepared dataset (12 train images of 32 px, 3 classes) and nothing else."""
    project = write_project(tmp_path_factory.mktemp("ddp") / "prepared", overrides=NO_DROP_PATH)
    run_stage(project, "prepare")
    return project


def _project(prepared: Path, folder: Path, runtime: dict, overrides: dict) -> Path:
    shutil.copytree(prepared / "data", folder / "data")
    return write_project(folder, overrides={"runtime": runtime, **overrides})


def _run(project: Path, args: list[str], site: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = stage_env()
    if site is not None:
        env["PYTHONPATH"] = f"{site}:{env['PYTHONPATH']}"
    return subprocess.run([sys.executable, *args, "--params", "params.yaml"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=400)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def _assert_same_weights(single: Path, ddp: Path, atol: float) -> None:
    reference, candidate = _weights(single), _weights(ddp)
    assert reference.keys() == candidate.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(candidate[name].double(), tensor.double(), atol=atol, rtol=1e-4, msg=name)


def _train_both(prepared: Path, tmp_path: Path, args: list[str], overrides: dict,
                site: Path | None = None) -> tuple[Path, Path]:
    single = _project(prepared, tmp_path / "single", {}, overrides)
    ddp = _project(prepared, tmp_path / "ddp", TWO_PROCESSES, overrides)
    for project in (single, ddp):
        completed = _run(project, args, site)
        assert completed.returncode == 0, completed.stderr[-4000:]
    return single, ddp


@pytest.mark.slow
def test_cam_train_two_processes_match_one(prepared: Path, tmp_path: Path) -> None:
    """6 AdamW steps of MCTformer at global batch 4 (2 images per rank). ~25 s on this machine."""
    single, ddp = _train_both(prepared, tmp_path, ["-m", "pipeline.cam_train"], NO_DROP_PATH)
    model = "artifacts/mctformer/model.pt"
    _assert_same_weights(single / model, ddp / model, atol=1e-6)
    # Rank 0 wrote one dvclive log whose losses are the global batch's (the ranks' mean), as one process logs.
    log = "dvclive/cam_train/plots/metrics/train/loss.tsv"
    rows_single = [row.split("\t") for row in (single / log).read_text().splitlines()[1:]]
    rows_ddp = [row.split("\t") for row in (ddp / log).read_text().splitlines()[1:]]
    assert len(rows_single) == len(rows_ddp) == 2
    for (step_a, loss_a), (step_b, loss_b) in zip(rows_single, rows_ddp):
        assert step_a == step_b and abs(float(loss_a) - float(loss_b)) < 1e-5
    assert not (ddp / "checkpoints" / "cam_train").exists()  # cleared by rank 0 once the model was written


@pytest.mark.slow
def test_seg_train_two_processes_match_one(prepared: Path, tmp_path: Path) -> None:
    """One SGD step of DeepLabV3+ r18 on the 12 GT masks (global batch 12, 6 per rank): cross-process batch
    norm and the cross-entropy over the global batch's labelled pixels give one process's gradient, so the
    weights (and the BN running statistics) agree to float32 rounding. ~30 s on this machine.

    SGD, not AdamW: Adam's first step moves every weight by about ±lr whatever its gradient's size, so
    gradients that are ~0 up to rounding (the conv biases before a BN) would differ by 2 lr.
    """
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_DROPOUT_SITE)
    overrides = {**NO_DROP_PATH, "seg": {"train": {"epochs": 1, "batch_size": 12, "optimizer": "sgd", "lr": 0.01}}}
    single, ddp = _train_both(prepared, tmp_path, ["-m", "pipeline.seg_train", "--source", "gt"], overrides, site)
    model = "artifacts/seg/gt/model.pt"
    _assert_same_weights(single / model, ddp / model, atol=2e-6)
    assert _weights(ddp / model)["encoder.bn1.num_batches_tracked"].item() == 1


@pytest.mark.slow
def test_clip_pretraining_gathers_the_global_batch(prepared: Path, tmp_path: Path) -> None:
    """3 contrastive steps at global batch 4: each rank encodes 2 pairs, the features are gathered with
    gradient, so the 4×4 logits (and the loss) are one process's. ~20 s on this machine."""
    overrides = {**NO_DROP_PATH, "clip": {"source": "pretrain", "pretrain": {"epochs": 1, "batch_size": 4, "corpus": "train_split"}}}
    single, ddp = _train_both(prepared, tmp_path, ["-m", "pipeline.clip"], overrides)
    weights = "artifacts/clip/weights.pt"
    reference = torch.load(single / weights, map_location="cpu")
    candidate = torch.load(ddp / weights, map_location="cpu")
    assert reference.keys() == candidate.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(candidate[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


COUNT_SCORED_SITE = """import os

import weakclip_core.evaluation.split_score as split_score

_predict_label_batch = split_score.predict_label_batch


def _counting(model, images, *args, **kwargs):
    # each process appends how many images it scores to its rank's file (torchrun's RANK; 0 alone)
    path = os.path.join(os.environ["SCORED_COUNTS_DIR"], "rank" + os.environ.get("RANK", "0") + ".txt")
    with open(path, "a") as counts:
        counts.write(str(len(images)) + "\\n")
    return _predict_label_batch(model, images, *args, **kwargs)


split_score.predict_label_batch = _counting
"""


@pytest.mark.slow
def test_weakclip_train_under_two_processes_scores_the_whole_split_as_one_process(
        prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``weakclip_train`` under torchrun (6 steps on the GT masks): after training each rank scores half of the
    train split (counted in the stage's processes by a ``sitecustomize``) and rank 0 writes the whole split's
    figures, those one process scoring the saved model gives (``evaluate_on_split`` without a process group; to
    0.002 mIoU, as a kernel at another batch size may round a near-tie pixel the other way). ~20 s here."""
    import json

    from pipeline.weakclip_train import evaluate_on_split
    from tests.faults.tiny_chain import TINY_PARAMS
    from weakclip_core.artifacts.weakclip import load_weakclip_model
    from weakclip_core.config import ClipConfig, build_dataclass
    from weakclip_core.data.layout import PreparedDataset
    from weakclip_core.models.clip import build_clip, save_clip_artifact

    ddp = _project(prepared, tmp_path / "ddp", TWO_PROCESSES, {**NO_DROP_PATH, "weakclip": {"seeds": {"source": "gt"}}})
    clip_cfg = build_dataclass(ClipConfig, {"source": "random", "arch": dict(TINY_PARAMS["clip"]["arch"])})
    torch.manual_seed(0)
    save_clip_artifact(ddp / "artifacts/clip", build_clip(clip_cfg), clip_cfg)  # the clip stage's artifact, no stage
    site, counts = tmp_path / "site", tmp_path / "counts"
    site.mkdir()
    counts.mkdir()
    (site / "sitecustomize.py").write_text(COUNT_SCORED_SITE)
    monkeypatch.setenv("SCORED_COUNTS_DIR", str(counts))
    completed = _run(ddp, ["-m", "pipeline.weakclip_train"], site)
    assert completed.returncode == 0, completed.stderr[-4000:]
    scored = {path.stem: sum(int(line) for line in path.read_text().split()) for path in counts.glob("rank*.txt")}
    assert scored == {"rank0": 6, "rank1": 6}  # 12 train images, half each
    metrics = json.loads((ddp / "metrics/weakclip.json").read_text())
    dataset = PreparedDataset.open(ddp / "data/prepared/tiny")
    model = load_weakclip_model(ddp / "artifacts/weakclip/model.pt", ddp / "artifacts/clip")
    report, n_scored = evaluate_on_split(model, dataset, dataset.split("train"), crop=32, device=torch.device("cpu"),
                                         show_progress=False)
    assert metrics["n_images"] == n_scored == 12
    assert metrics["miou"] == pytest.approx(report["miou"], abs=0.002)


@pytest.mark.parametrize(("stage", "key", "section"), [
    ("pipeline.seg_train", "seg.train.batch_size", {"seg": {"train": {"batch_size": 3}}}),
    ("pipeline.cam_train", "cam.train.batch_size", {"cam": {"train": {"batch_size": 5}}}),
    ("pipeline.weakclip_train", "weakclip.train.batch_size", {"weakclip": {"train": {"batch_size": 3}}}),
])
def test_batch_that_does_not_divide_over_nproc_is_one_clear_line(tmp_path: Path, stage: str, key: str,
                                                                section: dict) -> None:
    project = write_project(tmp_path, overrides={"runtime": TWO_PROCESSES, **section})
    args = ["-m", stage, *(["--source", "gt"] if stage == "pipeline.seg_train" else [])]
    completed = _run(project, args)
    assert completed.returncode == 1
    stage_name = stage.split(".")[1]
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{stage_name}: error: {key}:"), completed.stderr
    assert "runtime.nproc = 2" in lines[0]

"""Each long stage is SIGKILLed at a seeded point and re-run: it resumes, ends bit-identical to an
uninterrupted run (CPU), and no file under a final name is ever truncated.

The kill is real (``SIGKILL`` of the stage's own process, from inside it, at the n-th event; see
``tiny_chain.py``); ``n`` is drawn from ``random.Random(<stage name>)``, so each stage dies at a
reproducible but arbitrary point. Resumption is observed from outside: the re-run's progress bar
starts where the last durable checkpoint (or manifest) says, not at zero.
"""

from __future__ import annotations

import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny_chain import (KILLED_RETURNCODE, STAGE_OUTPUTS, copy_without, differing_files, is_temporary, output_files,
                        run_stage, run_stage_killed, unreadable_final_files)

N_TRAIN = 12


@dataclass(frozen=True)
class KillPlan:
    """Where a stage dies: the ``event`` it counts and the range the kill index is drawn from."""

    stage: str
    event: str
    low: int
    high: int
    final_output: str  # absent after the kill: the stage never got to write it

    def draw(self) -> int:
        return random.Random(self.stage).randint(self.low, self.high)


PLANS = [
    # 6 steps, one checkpoint per step: the k-th rename is step k's checkpoint → dies mid-checkpoint.
    KillPlan("cam_train", "replace", 2, 6, "artifacts/mctformer/model.pt"),
    # 12 train images: dies with k CAMs in the store's temporary file.
    KillPlan("cam_infer", "cam", 1, N_TRAIN - 1, "artifacts/cams/train.h5"),
    # 6 iterations: dies after step k's update, before its checkpoint.
    KillPlan("weakclip_train", "step", 2, 5, "artifacts/weakclip/model.pt"),
    # rename 1 is the work folder's config.json, then raw + mask PNG per image: dies mid-mask.
    KillPlan("pseudo_masks", "replace", 3, 2 * N_TRAIN, "data/pseudo_masks"),
    # 12 images / batch 4 = 3 steps per epoch, 2 epochs, one checkpoint per step.
    KillPlan("seg_train", "replace", 2, 6, "artifacts/seg/pseudo/model.pt"),
]


def checkpoint_steps(project: Path) -> list[int]:
    import torch

    return [int(torch.load(path, map_location="cpu", weights_only=True)["step"])
            for path in (project / "checkpoints").rglob("last.pt")]


def progress_positions(stderr: str, total: int) -> list[int]:
    """Every ``n/total`` position tqdm printed (the first one is where the run started)."""
    return [int(value) for value in re.findall(rf"\|\s*(\d+)/{total}\b", stderr)]


@pytest.mark.slow
@pytest.mark.parametrize("plan", PLANS, ids=[plan.stage for plan in PLANS])
def test_killed_stage_resumes_to_the_uninterrupted_result(plan: KillPlan, reference_project: Path,
                                                          tmp_path: Path) -> None:
    project = copy_without(reference_project, tmp_path / "project", plan.stage)
    after = plan.draw()

    killed = run_stage_killed(project, plan.stage, plan.event, after)
    assert killed.returncode == KILLED_RETURNCODE, killed.stderr[-2000:]
    assert not (project / plan.final_output).exists()
    assert unreadable_final_files(project) == []
    leftovers = [path for path in project.rglob("*") if is_temporary(path)]
    if plan.event in ("replace", "cam"):
        assert leftovers, "the kill landed inside a write: its temporary file is left behind, unnamed"

    if plan.stage in ("cam_train", "weakclip_train", "seg_train"):
        # The last durable checkpoint: the kill lost the step in flight (replace: its checkpoint
        # was not renamed; step: the update happened, its checkpoint was not written yet).
        assert checkpoint_steps(project) == [after - 1]
        # `dvc repro` deletes a stage's declared outputs before it runs it again, the dvclive folder with its plot
        # rows among them: the rows before the checkpoint come back from it (they used to be lost, the plots then
        # starting at the checkpoint's step; the model was right, the lock's plots hash was not).
        for relative in STAGE_OUTPUTS[plan.stage]:
            if relative.startswith("dvclive/"):
                shutil.rmtree(project / relative)
    resumed = run_stage(project, plan.stage)

    if plan.stage in ("cam_train", "weakclip_train", "seg_train"):
        positions = progress_positions(resumed.stderr, 6)
        assert positions and positions[0] == after - 1, resumed.stderr[-1500:]
        assert not list((project / "checkpoints").rglob("last.pt")), "checkpoints are cleared when done"
    if plan.stage == "pseudo_masks":
        # rename 1 = config.json, then (raw, mask) per image: images before the killed rename are done.
        done_before_kill = (after - 2) // 2
        positions = progress_positions(resumed.stderr, N_TRAIN - done_before_kill)
        assert positions and positions[0] == 0, resumed.stderr[-1500:]

    assert differing_files(reference_project, project, plan.stage) == []
    assert output_files(project, plan.stage), "the stage wrote its outputs"
    assert unreadable_final_files(project) == []

"""The one training loop (weakclip_core/training/loop.py) against a plain loop written out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from weakclip_core.runtime.distributed import single_process_context
from weakclip_core.training.checkpoint import Checkpointer
from weakclip_core.training.loop import LoopPlan, LoopState, NonFiniteLossError, WindowEnd, run_training_loop

STEPS, WINDOW, CHECKPOINT_EVERY = 7, 3, 2


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, generator=generator), torch.randn(4, 1, generator=generator)) for _ in range(STEPS)]


def lr_at(step: int) -> float:
    return 0.1 / (step + 1)


def fresh_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def hand_written_run() -> tuple[dict[str, torch.Tensor], list[float]]:
    """What every trainer did before the loop was shared: lr, forward, zero_grad, backward, step."""
    model, optimizer = fresh_model()
    losses = []
    for step, (inputs, targets) in enumerate(batches()):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = nn.functional.mse_loss(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return model.state_dict(), losses


def loop_run(checkpoint_root: Path, stop_after_steps: int | None = None, windows: list[WindowEnd] | None = None,
             saved_steps: list[int] | None = None) -> tuple[nn.Module, bool]:
    model, optimizer = fresh_model()
    checkpointer = Checkpointer("toy", {"toy": 1}, root=checkpoint_root)
    start_step, extra = checkpointer.resume(model, optimizer)
    original_save = checkpointer.save

    def recording_save(module: nn.Module, optimizer: torch.optim.Optimizer, step: int, extra: dict) -> None:
        (saved_steps if saved_steps is not None else []).append(step)
        original_save(module, optimizer, step, extra)

    checkpointer.save = recording_save  # type: ignore[method-assign]

    def compute_losses(step: int, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        prediction = model(batch[0])
        return {"loss": nn.functional.mse_loss(prediction, batch[1]),
                "mean_prediction": prediction.detach().mean()}

    result = run_training_loop(
        name="toy", lr_key="toy.lr",
        plan=LoopPlan(total_steps=STEPS, window_steps=WINDOW, checkpoint_every=CHECKPOINT_EVERY, lr_at=lr_at),
        batches=batches()[start_step:], start_step=start_step, model=model, optimizer=optimizer,
        compute_losses=compute_losses, context=single_process_context(torch.device("cpu")),
        checkpointer=checkpointer, state=LoopState.from_dict(extra.get("loop")),
        on_window_end=(windows.append if windows is not None else None), stop_after_steps=stop_after_steps,
        show_progress=False)
    return model, result.finished


def test_the_loop_takes_the_hand_written_steps_and_logs_window_means(tmp_path: Path) -> None:
    expected_state, step_losses = hand_written_run()
    windows: list[WindowEnd] = []
    saved_steps: list[int] = []
    model, finished = loop_run(tmp_path, windows=windows, saved_steps=saved_steps)
    assert finished
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected_state[key]), key
    # windows end after 3, 6 and the last step (7); each logs the mean of its steps' losses
    assert [window.done for window in windows] == [3, 6, 7]
    for window, (first, last) in zip(windows, [(0, 3), (3, 6), (6, 7)]):
        assert window.mean_losses["loss"] == pytest.approx(sum(step_losses[first:last]) / (last - first), rel=1e-12)
        assert window.lr == lr_at(last - 1)
    # checkpoints every 2 steps and at each window's end (the final step included)
    assert saved_steps == [2, 3, 4, 6, 7]


def test_a_stopped_loop_resumes_to_the_same_weights_and_windows(tmp_path: Path) -> None:
    straight_windows: list[WindowEnd] = []
    straight, _ = loop_run(tmp_path / "straight", windows=straight_windows)
    first_windows: list[WindowEnd] = []
    _, finished = loop_run(tmp_path / "resumed", stop_after_steps=5, windows=first_windows)
    assert not finished
    resumed_windows: list[WindowEnd] = []
    resumed, finished = loop_run(tmp_path / "resumed", windows=resumed_windows)  # from the step-4 checkpoint
    assert finished
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    # the window 4..6 is logged once more by the resumed run, with the straight run's means
    assert [w.done for w in first_windows] == [3] and [w.done for w in resumed_windows] == [6, 7]
    assert resumed_windows == straight_windows[1:]


def test_a_non_finite_loss_names_the_lr_key(tmp_path: Path) -> None:
    model, optimizer = fresh_model()
    with pytest.raises(NonFiniteLossError, match=r"^toy: loss became nan at step 0 \(lower toy\.lr\?\)$"):
        run_training_loop(
            name="toy", lr_key="toy.lr",
            plan=LoopPlan(total_steps=2, window_steps=1, checkpoint_every=1, lr_at=lr_at),
            batches=batches()[:2], start_step=0, model=model, optimizer=optimizer,
            compute_losses=lambda step, batch: {"loss": model(batch[0]).sum() * float("nan")},
            context=single_process_context(torch.device("cpu")),
            checkpointer=Checkpointer("toy", {}, root=tmp_path), show_progress=False)


def test_a_plan_can_skip_window_end_and_final_checkpoints() -> None:
    plan = LoopPlan(total_steps=20, window_steps=10, checkpoint_every=8, lr_at=lr_at,
                    checkpoint_at_window_end=False, checkpoint_final=False)
    assert [done for done in range(1, 21) if plan.checkpoints(done, plan.window_ends(done))] == [8, 16]

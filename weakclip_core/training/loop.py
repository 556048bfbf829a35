"""The one training loop every trainer runs (MCTformer, the small CLIP, WeakCLIP, the retrained segmenter).

What a trainer differs in is passed in: how a step's batch becomes named losses (``compute_losses``), the lr at
each step, how long a logging window is (an epoch, or a fixed number of steps), what happens at a window's
end (evaluation, logging: ``on_window_end``, the stage's business) and what else a checkpoint must hold
(``checkpoint_extra``). What every trainer shares lives here once: the lr update, the step itself
(``zero_grad`` → ``backward`` → ``step``), the mean of the logged losses over DDP processes, the finite-loss
check, the progress bar, the running window means, the checkpoint cadence on rank 0, and a stop "as if
killed" for the resumption tests.

The step's order of operations is fixed (lr, ``train()``, forward + losses, ``zero_grad``, ``backward``,
``step``, ``after_step``), so a trainer moved onto this loop draws the same random numbers in the same order
and reaches bit-identical weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from weakclip_core.errors import InputError
from weakclip_core.runtime.device import autocast
from weakclip_core.runtime.distributed import DistributedContext, all_reduce_mean
from weakclip_core.training.checkpoint import Checkpointer
from weakclip_core.training.schedules import set_lr

TOTAL_LOSS = "loss"
"""The key of ``compute_losses``'s result that is back-propagated; the other keys are logged only."""


class NonFiniteLossError(InputError):
    """The loss became NaN or infinite: training cannot go on (the message names the lr key to lower)."""


@dataclass(frozen=True)
class LoopPlan:
    """How long the loop runs and when it logs and checkpoints.

    Steps are 0-based; ``done = step + 1`` steps are complete after step ``step``. A logging window ends when
    ``done`` is a multiple of ``window_steps`` or the last step; the loop then hands the window's mean losses
    to ``on_window_end``, on every DDP rank (a sharded evaluation needs them all; logging is rank 0's, which
    the trainer's callback checks). A checkpoint is written when ``done`` is a multiple of ``checkpoint_every``, and
    also at each window's end when ``checkpoint_at_window_end`` (trainers whose windows are epochs).
    ``checkpoint_final`` keeps or skips a checkpoint after the last step (the final output follows it).
    """

    total_steps: int
    window_steps: int
    checkpoint_every: int
    lr_at: Callable[[int], float]
    checkpoint_at_window_end: bool = True
    checkpoint_final: bool = True

    def window_ends(self, done: int) -> bool:
        return done % self.window_steps == 0 or done == self.total_steps

    def checkpoints(self, done: int, window_end: bool) -> bool:
        if done == self.total_steps and not self.checkpoint_final:
            return False
        return (window_end and self.checkpoint_at_window_end) or done % self.checkpoint_every == 0


@dataclass(frozen=True)
class WindowEnd:
    """What the loop knows when a logging window closes: steps done, the window's mean losses, the last lr."""

    done: int
    mean_losses: dict[str, float]
    lr: float


@dataclass
class LoopState:
    """The running window (sums of the logged losses over its steps) and the last step's losses.

    Saved in every checkpoint under ``"loop"``, so a resumed run logs the same window means.
    """

    window_sums: dict[str, float] = field(default_factory=dict)
    window_steps: int = 0
    last_losses: dict[str, float] = field(default_factory=dict)

    def add(self, losses: Mapping[str, float]) -> None:
        for name, value in losses.items():
            self.window_sums[name] = self.window_sums.get(name, 0.0) + value
        self.window_steps += 1
        self.last_losses = dict(losses)

    def means(self) -> dict[str, float]:
        return {name: total / self.window_steps for name, total in self.window_sums.items()}

    def reset_window(self) -> None:
        self.window_sums, self.window_steps = {}, 0

    def as_dict(self) -> dict[str, Any]:
        return {"window_sums": dict(self.window_sums), "window_steps": self.window_steps,
                "last_losses": dict(self.last_losses)}

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any] | None) -> "LoopState":
        saved = saved or {}
        return cls({name: float(value) for name, value in saved.get("window_sums", {}).items()},
                   int(saved.get("window_steps", 0)),
                   {name: float(value) for name, value in saved.get("last_losses", {}).items()})


@dataclass(frozen=True)
class LoopResult:
    """``finished``: every step ran (else the loop was stopped early). ``last_losses``: the last step's."""

    finished: bool
    steps_this_run: int
    last_losses: dict[str, float]


def reduced_losses(losses: Mapping[str, torch.Tensor], context: DistributedContext) -> dict[str, float]:
    """The named losses as floats; under DDP their mean over the processes (float64), as every rank logs it."""
    values = {name: float(tensor.detach()) for name, tensor in losses.items()}
    if not context.is_distributed:
        return values
    means = all_reduce_mean(torch.tensor(list(values.values()), dtype=torch.float64, device=context.device), context)
    return dict(zip(values, means.tolist()))


def run_training_loop(
    *,
    name: str,
    lr_key: str,
    plan: LoopPlan,
    batches: Iterable[Any],
    start_step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    compute_losses: Callable[[int, Any], Mapping[str, torch.Tensor]],
    context: DistributedContext,
    checkpointer: Checkpointer,
    checkpointed_module: nn.Module | None = None,
    state: LoopState | None = None,
    on_window_end: Callable[[WindowEnd], None] | None = None,
    checkpoint_extra: Callable[[], dict[str, Any]] | None = None,
    after_step: Callable[[], None] | None = None,
    stop_after_steps: int | None = None,
    show_progress: bool = True,
    precision: str = "fp32",
) -> LoopResult:
    """Run steps ``start_step .. plan.total_steps - 1`` over ``batches`` (one batch per step, in order).

    ``model`` is put in train mode before each step (window callbacks may evaluate in between);
    ``compute_losses(step, batch)`` runs the forward and returns named scalar losses with the total
    under ``"loss"``. ``checkpointed_module`` is what checkpoints hold (default ``model``; WeakCLIP saves only its
    learned parts). ``state`` is the window resumed from a checkpoint's ``"loop"`` entry. ``stop_after_steps``
    ends this call after that many steps as if the process were killed (only the periodic checkpoints are
    written; the next call resumes). Raises :class:`NonFiniteLossError` naming ``lr_key`` when the loss
    stops being finite. ``precision`` (``runtime.precision``): ``bf16`` runs ``compute_losses`` (forward and
    losses) under ``torch.autocast``; backward and the optimizer step stay outside it, as autocast intends
    (gradients come back in each parameter's own dtype, fp32). ``fp32`` adds no context at all.
    """
    state = state or LoopState()
    saved_module = checkpointed_module if checkpointed_module is not None else model
    progress = tqdm(total=plan.total_steps, initial=start_step, desc=name, unit="step",
                    disable=not (show_progress and context.is_main))
    steps_this_run = 0
    try:
        for step, batch in enumerate(batches, start=start_step):
            lr = plan.lr_at(step)
            set_lr(optimizer, lr)
            model.train()
            with autocast(context.device, precision):
                losses = compute_losses(step, batch)
            optimizer.zero_grad(set_to_none=True)
            losses[TOTAL_LOSS].backward()
            optimizer.step()
            if after_step is not None:
                after_step()
            values = reduced_losses(losses, context)
            if not math.isfinite(values[TOTAL_LOSS]):
                raise NonFiniteLossError(f"{name}: loss became {values[TOTAL_LOSS]} at step {step} (lower {lr_key}?)")
            state.add(values)
            done = step + 1
            progress.update(1)
            progress.set_postfix({key: f"{value:.3f}" for key, value in list(values.items())[:2]} | {"lr": f"{lr:.2e}"})
            window_end = plan.window_ends(done)
            if window_end:
                if on_window_end is not None:  # every rank: an evaluation there may be shared out over them
                    on_window_end(WindowEnd(done, state.means(), lr))
                state.reset_window()
            if plan.checkpoints(done, window_end) and context.is_main:
                checkpointer.save(saved_module, optimizer, done,
                                  extra={"loop": state.as_dict(), **(checkpoint_extra() if checkpoint_extra else {})})
            steps_this_run += 1
            if stop_after_steps is not None and steps_this_run >= stop_after_steps and done < plan.total_steps:
                return LoopResult(False, steps_this_run, state.last_losses)
    finally:
        progress.close()
    return LoopResult(True, steps_this_run, state.last_losses)

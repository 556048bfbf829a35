"""What every stage's command line shares: arguments, the torchrun relaunch, one-line errors, wall time, dvclive.

A stage module keeps its own work (``train_cam_model``, ``run_shard`` ...) and ends with::

    def main(argv=None):
        return run_stage(STAGE_SPEC, argv)

    if __name__ == "__main__":
        run_stage_cli(main, STAGE)

- :func:`run_stage` parses ``--params`` (and the stage's own arguments), loads the typed params, relaunches
  a DDP-capable stage under ``torchrun`` when ``runtime.launcher`` asks for it, runs the work in its
  process-group context, prints the work's summary line on rank 0 and records the stage's wall time in
  ``timings/<stage>.json`` (not a DVC output: a re-run with identical results leaves ``dvc.lock`` as it was).
- :func:`run_stage` holds the stage's *work lock* while it runs (``checkpoints/.locks/<label>.lock``, ``fcntl.flock``):
  a second run of the same stage in the same workspace is refused in one line (``StageBusyError``: ``another
  run of cam_train is in progress in this workspace (pid N)``) before it reads or writes anything, so two
  direct runs never interleave their dvclive rows, checkpoints or work folders. ``pseudo_masks --shard i/n``
  (n > 1) takes the stage's lock shared and its shard's lock exclusive: shards run at once, the same shard
  twice does not, and an unsharded or ``--merge`` run waits for none of them (it is refused while any shard
  runs). torchrun workers take no lock (the launching process holds it). The kernel drops a lock when its
  process ends, however it ends (SIGKILL included), so a stale lock never blocks the next run. ``dvc repro``
  runs stages one at a time and refuses a second ``dvc repro`` with its own lock.
- :func:`run_stage_cli` turns the library's :class:`~weakclip_core.errors.InputError` (and the stage's own
  input errors) into ``<stage>: error: <message>`` and exit status 1; ``WEAKCLIP_TRACEBACK=1`` shows the
  traceback instead. Any other exception is a bug and keeps its traceback. SIGINT and SIGTERM raise
  :class:`StageInterrupted` in the main thread, so every ``finally`` and atomic writer cleans up (temporaries
  deleted, process pools shut down); the stage then prints ``<stage>: interrupted (SIGINT)`` and exits
  130 (SIGINT) or 143 (SIGTERM), the shell's 128 + signal number, in every stage.
- :func:`require_input` names the stage to run when an upstream artifact is missing; :func:`params_key`
  names the params key behind a model or file the library refused.
- :class:`LiveLog` writes a trainer's window means to dvclive (and trims rows a resumed run logs again).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm

from weakclip_core.artifacts.atomic import write_json, write_text
from weakclip_core.config import Params, load_params
from weakclip_core.config.params import RuntimeConfig, check_batches_divide
from weakclip_core.config.schema import ConfigError
from weakclip_core.errors import InputError

from pipeline._locks import stage_lock

TIMINGS_DIR = Path("timings")


class MissingInputError(FileNotFoundError):
    """An upstream artifact a stage reads does not exist; the message names it and the stage that makes it."""


def require_input(path: str | Path, made_by_stage: str) -> Path:
    """``path`` as a ``Path`` when it exists; else ``MissingInputError``: ``<path> does not exist: run
    `dvc repro <made_by_stage>` first``. Stages call it where they open an upstream artifact, so a chain
    run out of order says what to run instead of Python's bare ``No such file or directory``."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path} does not exist: run `dvc repro {made_by_stage}` first")
    return path


INPUT_ERRORS: tuple[type[BaseException], ...] = (InputError, FileNotFoundError, OSError)

# --------------------------------------------------------------------------- interrupts

INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StageInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the stage (a ``KeyboardInterrupt``, so code that cleans up after Ctrl-C also
    cleans up after SIGTERM); ``run_stage_cli`` turns it into one line and exit status 128 + ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_interrupt_state: dict[str, Any] = {"signum": None, "pid": None}


def _on_interrupt(signum: int, frame: object) -> None:
    if os.getpid() != _interrupt_state["pid"]:
        # A forked worker (data loader, pool) inherited this handler: its parent does the cleanup. SIGINT
        # (Ctrl-C reaches the whole process group) is left to the parent; SIGTERM ends the worker as usual.
        if signum == signal.SIGTERM:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        return
    if _interrupt_state["signum"] is None:
        _interrupt_state["signum"] = signum
    raise StageInterrupted(signum)


@contextmanager
def interrupts_raise() -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM raise :class:`StageInterrupted` in the main thread; the
    previous handlers come back afterwards (tests run stages in the pytest process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _interrupt_state.update(signum=None, pid=os.getpid())
    previous = {signum: signal.signal(signum, _on_interrupt) for signum in INTERRUPT_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def received_interrupt() -> int | None:
    """The signal that interrupted the running stage, or ``None``."""
    return _interrupt_state["signum"]


if multiprocessing.current_process().name != "MainProcess":
    # A spawned pool worker (pseudo_masks' and weakclip_train's CRF pools) imports the stage module, hence
    # this one: Ctrl-C reaches it too, but its parent shuts the pool down, so it ignores SIGINT instead of
    # printing its own traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def params_key(key: str) -> Iterator[None]:
    """The block builds something from params key ``key``: a ``ValueError`` it raises (the library's messages
    speak of the model's terms, not of ``params.yaml``) becomes a one-line ``ConfigError`` naming the key."""
    try:
        yield
    except ValueError as error:
        raise ConfigError(f"{key}: {error}") from error


def _close_progress_bars() -> None:
    """Finish the progress bars the failed stage left open, so the error starts its own line."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _is_rank_zero() -> bool:
    return "LOCAL_RANK" not in os.environ or os.environ.get("RANK", "0") == "0"


def run_stage_cli(main: Callable[[], object], stage: str,
                  extra_errors: tuple[type[BaseException], ...] = ()) -> None:
    """Run ``main()``; input errors become ``<stage>: error: <message>`` on stderr and exit status 1;
    SIGINT / SIGTERM become ``<stage>: interrupted (SIGINT)`` and exit status 130 / 143 (also when the
    interrupt surfaced as another exception, e.g. a pool whose workers it stopped)."""
    try:
        with interrupts_raise():
            result = main()
    except BaseException as error:  # noqa: BLE001 — sorted below; anything unexpected is re-raised
        interrupted = received_interrupt()
        if isinstance(error, StageInterrupted):
            interrupted = error.signum
        elif isinstance(error, KeyboardInterrupt):
            interrupted = signal.SIGINT
        if interrupted is not None and not isinstance(error, SystemExit):
            if os.environ.get("WEAKCLIP_TRACEBACK"):
                raise
            _close_progress_bars()
            if _is_rank_zero():
                print(f"{stage}: interrupted ({signal.Signals(interrupted).name})", file=sys.stderr)
            raise SystemExit(128 + int(interrupted)) from None
        if not isinstance(error, INPUT_ERRORS + extra_errors):
            raise
        if os.environ.get("WEAKCLIP_TRACEBACK"):
            raise
        _close_progress_bars()
        print(f"{stage}: error: {error}", file=sys.stderr)
        for note in getattr(error, "__notes__", []):
            print(f"  {note}", file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(result if isinstance(result, int) else 0)


# --------------------------------------------------------------------------- torchrun

def stage_command(module: str, runtime: RuntimeConfig, args: Sequence[str] = ()) -> list[str]:
    """The command that runs stage ``module`` (``pipeline.cam_train``) as ``runtime`` asks.

    ``launcher: none`` → ``python -m <module> <args>``;
    ``launcher: torchrun`` → ``torchrun --standalone --nproc_per_node <nproc> -m <module> <args>``.
    """
    if runtime.launcher == "none":
        return [sys.executable, "-m", module, *args]
    torchrun = Path(sys.executable).parent / "torchrun"
    executable = str(torchrun) if torchrun.exists() else (shutil.which("torchrun") or "torchrun")
    return [executable, "--standalone", "--nproc_per_node", str(runtime.nproc), "-m", module, *args]


def relaunch_under_torchrun(module: str, runtime: RuntimeConfig, args: Sequence[str]) -> int | None:
    """Re-run this stage under torchrun when asked and not already under it; returns its exit code.

    ``None`` means "carry on in this process" (launcher none, or already a torchrun worker); an int means
    the torchrun job ran and the stage should exit with that code.
    """
    if runtime.launcher != "torchrun" or "LOCAL_RANK" in os.environ:
        return None
    with subprocess.Popen(stage_command(module, runtime, args)) as job:
        try:
            return job.wait()
        except StageInterrupted as interrupt:
            # torchrun stops its workers on SIGINT / SIGTERM: pass the signal on and let it (a SIGKILL, which
            # subprocess.run would send, would leave the workers running).
            if job.poll() is None:
                job.send_signal(interrupt.signum)
            try:
                job.wait(timeout=60)
            except subprocess.TimeoutExpired:
                job.kill()
            raise


def check_gpus_for_torchrun(runtime: RuntimeConfig) -> None:
    """Under torchrun on CUDA each of the ``runtime.nproc`` processes takes GPU ``LOCAL_RANK``: with fewer GPUs
    visible the job starts and a rank dies in ``torch.cuda.set_device`` ("invalid device ordinal"), after
    which the stage is retried to no end on the pools. Refused before the launch, naming the keys (a Prefect
    GPU deployment sees one GPU unless deployed with ``--gpus-per-stage``)."""
    if runtime.launcher != "torchrun" or "LOCAL_RANK" in os.environ:
        return
    import torch  # here, not at the top: the stages without DDP start without torch (summary)

    from weakclip_core.runtime.device import resolve_device

    if resolve_device(runtime.device).type != "cuda":
        return
    visible = torch.cuda.device_count()
    if runtime.nproc > visible:
        raise ConfigError(
            f"runtime.nproc: {runtime.nproc} processes under runtime.launcher: torchrun take one GPU each, and "
            f"{visible} {'is' if visible == 1 else 'are'} visible here (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); lower runtime.nproc, or give the stage more GPUs "
            f"(Prefect pools: python -m flows.deploy --gpus <N> --gpus-per-stage {runtime.nproc})")


def launch_stage(module: str, runtime: RuntimeConfig, args: Sequence[str] | None,
                 batches: Mapping[str, int]) -> int | None:
    """A DDP-capable stage's first step: check the batches and the GPUs, then relaunch under torchrun when asked.

    ``args`` are the stage's command-line arguments (``None``: ``sys.argv[1:]``).
    Returns ``None`` to carry on in this process, or the torchrun job's exit code.
    """
    check_batches_divide(runtime, batches)
    check_gpus_for_torchrun(runtime)
    return relaunch_under_torchrun(module, runtime, sys.argv[1:] if args is None else args)


# --------------------------------------------------------------------------- the entry point

@dataclass(frozen=True)
class StageSpec:
    """A stage's command line.

    ``run(params, args, context)`` does the work and returns the one summary line to print (or ``None``).
    ``context`` is the DDP context for stages with ``global_batches`` (the training stages: they may run
    under torchrun), ``None`` for the others. ``global_batches(params)`` gives ``{params key: global batch}``
    to check against ``runtime.nproc``; ``label(args)`` names the run in ``timings/`` and its work lock
    (``seg_train@gt``); ``locks(args)`` replaces that one exclusive lock (``pipeline/_locks.py``: shards).
    """

    name: str
    module: str
    description: str
    run: Callable[[Params, argparse.Namespace, Any], str | None]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    global_batches: Callable[[Params], Mapping[str, int]] | None = None
    label: Callable[[argparse.Namespace], str] | None = None
    locks: Callable[[argparse.Namespace], list[tuple[str, bool]]] | None = None


def parse_stage_arguments(spec: StageSpec, argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m {spec.module}", description=spec.description)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
    if spec.add_arguments is not None:
        spec.add_arguments(parser)
    return parser.parse_args(argv)


def record_wall_time(label: str, seconds: float, timings_dir: Path = TIMINGS_DIR) -> None:
    """``timings/<label>.json``: the stage's last wall time, kept out of DVC's metrics and of git."""
    write_json(timings_dir / f"{label}.json", {
        "stage": label, "wall_s": round(seconds, 1),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})


def run_stage(spec: StageSpec, argv: Sequence[str] | None = None) -> int | None:
    """Parse, lock, load params, (re)launch, run, print the summary on rank 0, record the wall time.

    The work lock (:func:`stage_lock`) is held from before the params are read until the run ends; torchrun
    workers (``LOCAL_RANK`` set) run under their launcher's lock and take none."""
    args = parse_stage_arguments(spec, argv)
    if "LOCAL_RANK" in os.environ:
        return _run_stage_unlocked(spec, args, argv)
    label = spec.label(args) if spec.label else spec.name
    with stage_lock(spec.locks(args) if spec.locks else [(label, True)]):
        return _run_stage_unlocked(spec, args, argv)


def _run_stage_unlocked(spec: StageSpec, args: argparse.Namespace, argv: Sequence[str] | None) -> int | None:
    started = time.perf_counter()
    params = load_params(args.params)
    if spec.global_batches is None:
        summary = spec.run(params, args, None)
        is_main = True
    else:
        from weakclip_core.runtime.distributed import distributed_context  # noqa: PLC0415 (imports torch)

        batches = spec.global_batches(params)  # none: nothing to split over processes, so no relaunch
        torchrun_code = launch_stage(spec.module, params.runtime, argv, batches) if batches else None
        if torchrun_code is not None:
            return torchrun_code
        with distributed_context(params.runtime.device) as context:
            summary = spec.run(params, args, context)
        is_main = context.is_main
    if not is_main:
        return None
    if summary:
        print(summary)
    if "LOCAL_RANK" not in os.environ or os.environ.get("RANK", "0") == "0":
        record_wall_time(spec.label(args) if spec.label else spec.name, time.perf_counter() - started)
    return None


# --------------------------------------------------------------------------- dvclive

def trim_live_history(live_dir: str | Path, first_dropped_step: int) -> None:
    """Drop dvclive plot rows at ``step >= first_dropped_step`` before a resumed run logs again.

    A run killed after logging a row but before the checkpoint that covers it is resumed from the
    earlier checkpoint and logs that row again; without trimming, the plot would hold it twice.
    Each ``plots/metrics/**/*.tsv`` (first column ``step``) is rewritten atomically.
    """
    for table in sorted((Path(live_dir) / "plots" / "metrics").rglob("*.tsv")):
        header, *rows = table.read_text().splitlines(keepends=True)
        kept = [row for row in rows if row.strip() and int(float(row.split("\t", 1)[0])) < first_dropped_step]
        if len(kept) != len(rows):
            write_text(table, header + "".join(kept))


def record_not_trained(model_path: Path, live_dir: Path, reason: str) -> Path:
    """A training stage with nothing to train (``seg_train@gt`` without GT, ``cam_train`` when the CAMs are
    imported): no model, but ``<model folder>/not_trained.json`` and a dvclive ``metrics.json`` saying why
    (``{"trained": false, "not_trained": reason}``) and a plots folder holding one header-only table
    (``NOT_TRAINED_PLOT``: a ``step`` column, no rows), so every output dvc.yaml declares exists and nothing pretends
    to be a model. Not an empty folder: the plots are ``cache: false`` outputs that git carries, and git holds no
    empty folder, so a fresh clone (or a pool worker's returned files) lacked it and ``dvc status`` called the
    stage's output deleted. Removes a model an earlier run left there.

    Safe when every DDP rank calls it at once (a preset's ``launcher: torchrun`` with nothing to train): each
    step tolerates the others' (the JSON writes are atomic renames of the same content, the plots folder is
    emptied without minding who removed it first, and each rank's last step writes the table into it again if
    another rank's emptying removed the folder or the table's temporary file under it)."""
    from weakclip_core.artifacts.model_file import NOT_TRAINED_FILE  # here: model_file imports torch

    model_path.unlink(missing_ok=True)
    record = {"trained": False, "not_trained": reason}
    not_trained = model_path.parent / NOT_TRAINED_FILE
    write_json(not_trained, record)
    write_json(live_dir / "metrics.json", record)
    plots = live_dir / "plots" / "metrics"
    shutil.rmtree(plots, ignore_errors=True)
    for attempt in range(100):  # another rank's rmtree may remove the folder, or the temporary file, under this write
        try:  # mkdir(exist_ok) too: it raises FileExistsError when the folder it found is gone before it looks
            plots.mkdir(parents=True, exist_ok=True)
            write_text(plots / NOT_TRAINED_PLOT, "step\n")
            break
        except (FileNotFoundError, FileExistsError):
            if attempt == 99:
                raise
    return not_trained


NOT_TRAINED_PLOT = "not_trained.tsv"
"""The one file of a not-trained stage's plots folder: a header with no rows (``dvc plots show`` reads it as
empty), so the folder exists wherever git puts the project."""


LIVE_HISTORY_KEY = "live_history"
"""Where a checkpoint's ``extra`` keeps the dvclive plot rows logged up to it (``LiveLog.history``)."""


class LiveLog:
    """A trainer's dvclive folder: window means as ``train/<loss>`` and ``train/lr`` rows, then extra metrics.

    ``step_of(done)`` is the dvclive step of a window that ends after ``done`` training steps (the epoch
    index for trainers that log per epoch, the step count for the others). A run resumed after
    ``resumed_at`` steps first puts back the rows its checkpoint saved (``saved_history``: ``dvc repro``
    deletes a stage's outputs, dvclive's folder with them, before it re-runs a killed stage, so the resumed
    run's plots used to start at the checkpoint's epoch), then drops the rows from the window holding its next
    step on, which it logs again.
    """

    def __init__(self, live_dir: str | Path, resumed_at: int, step_of: Callable[[int], int],
                 saved_history: Mapping[str, str] | None = None) -> None:
        from dvclive import Live  # noqa: PLC0415 (dvclive is slow to import; trainers only)

        self.step_of = step_of
        self.plots = Path(live_dir) / "plots" / "metrics"
        if resumed_at > 0:
            for relative, text in (saved_history or {}).items():
                write_text(self.plots / relative, text)
            trim_live_history(live_dir, step_of(resumed_at + 1))
        self.live = Live(str(live_dir), resume=resumed_at > 0, dvcyaml=None, save_dvc_exp=False, report=None)

    def history(self) -> dict[str, dict[str, str]]:
        """``{LIVE_HISTORY_KEY: {tsv path under plots/metrics: its text}}``, for a checkpoint's ``extra``."""
        return {LIVE_HISTORY_KEY: {table.relative_to(self.plots).as_posix(): table.read_text()
                                   for table in sorted(self.plots.rglob("*.tsv"))}}

    def log_window(self, done: int, mean_losses: Mapping[str, float], lr: float,
                   extra: Mapping[str, float] | None = None) -> None:
        self.live.step = self.step_of(done)
        for name, value in mean_losses.items():
            self.live.log_metric(f"train/{name}", value)
        self.live.log_metric("train/lr", lr)
        for name, value in (extra or {}).items():
            self.live.log_metric(name, value)
        self.live.next_step()

    def log_summary(self, metrics: Mapping[str, float]) -> None:
        """Single values (not plotted) in the folder's ``metrics.json``."""
        for name, value in metrics.items():
            self.live.log_metric(name, value, plot=False)

    def end(self) -> None:
        self.live.end()


"""The WeakCLIP ablations as DVC experiments over several seeds, and their mean ± std table for docs/RESULTS.md.

Why DVC experiments: each run is one ``dvc exp run -S key=value weakclip_train`` on top of the committed
baseline, so DVC re-runs only what the override touches (``weakclip_train``; ``clip`` too for the random-CLIP
row), keeps every run's params and metrics, and ``dvc exp show`` compares them in one table.

Why seeds: one run per variant cannot rank variants that differ by less than a run's own noise (another seed
moves WeakCLIP mIoU by a point or more). Every variant, the baseline included, runs once per seed offset
(``weakclip.train.seed_offset`` 1..N: WeakCLIP's own init, batch order, augmentation and dropout; the CLIP and
the CAM seeds stay the committed ones), all in the same queue with the same thread count, and the table shows
mean ± sample std over the seeds. Seed offset 0 is the committed run itself, made outside the queue (the
chain's thread count), so it is not one of the table's samples.

    python -m bench.ablations run [--table weakclip|boundary|ceiling] [--seeds 3] [--from-seed 1] [--jobs 2]
                                  [--only NAME ...]
    python -m bench.ablations collect [--table weakclip|boundary|ceiling]   # dvc exp show -> the table

``run`` queues, runs, waits, then collects. ``collect`` writes the table's file (``metrics/ablations_weakclip.json``:
the grid; ``metrics/ablations_boundary.json``: the boundary-loss study, issue #20 item 4;
``metrics/ablations_ceiling.json``: each frozen CLIP's ceiling, WeakCLIP trained on the GT masks) in the format
``pipeline/summary.py`` renders, and re-runs the ``summary`` stage. Experiment names are
``<variant>-s<seed offset>``; the tables share the experiments of the variants they both list. A queue that
re-ran part of a table (``--only``, with the baseline) keeps the committed rows of the variants it did not run
when its baseline reproduced the committed baseline seed for seed (``carry_previous_rows``); the table names the
carried rows. The queue's experiments hang off the commit that was HEAD when each was queued, so ``collect`` reads
every commit's (``dvc exp list --all-commits``, then ``dvc exp show`` of those commits) but counts only those of
commits whose committed run names the outputs ``dvc.lock`` names for ``weakclip_train`` and everything before it
(``baselines_with_these_outputs``): code-only commits keep their experiments, an output-changing commit leaves
the older ones out (named).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flows.dag import read_stage_graph
from flows.dvc_cli import capture_command, dvc_command, tool_environment
from flows.machines import out_hashes, read_lock
from pipeline.summary import BENCH_DATASET_DEFAULT
from weakclip_core.artifacts.atomic import process_alive, write_json

REPO = Path(__file__).resolve().parents[1]
# dvc-task's record of each queue worker (DVC 3.x): dvc-exp-worker-<n>.json, with its pid and, once it has exited,
# its return code.
QUEUE_WORKER_RECORDS = Path(".dvc") / "tmp" / "exps" / "celery"
OUTPUT = REPO / "metrics" / "ablations_weakclip.json"
WEAKCLIP_METRICS = "metrics/weakclip.json"
CAM_METRICS = REPO / "metrics" / "cam.json"
TARGET = "weakclip_train"


@dataclass(frozen=True)
class Ablation:
    """One variant: its ``dvc exp`` name stem, the row label, and the ``-S`` overrides."""

    name: str
    setting: str
    overrides: tuple[str, ...]


BASELINE = Ablation("abl-baseline", "default (N = 8, temperature init 0.1, no boundary loss, co-attention, "
                    "confident seeds, pretrained CLIP)", ())
ABLATIONS: tuple[Ablation, ...] = (
    Ablation("abl-prompt-2", "N = 2 learnable contexts", ("weakclip.prompt_len=2",)),
    Ablation("abl-prompt-4", "N = 4 learnable contexts", ("weakclip.prompt_len=4",)),
    Ablation("abl-prompt-16", "N = 16 learnable contexts (text context 24 tokens)",
             ("weakclip.prompt_len=16", "weakclip.text_context_length=24")),
    Ablation("abl-temp-1", "temperature init 1", ("weakclip.temperature_init=1.0",)),
    Ablation("abl-temp-0.01", "temperature init 0.01", ("weakclip.temperature_init=0.01",)),
    Ablation("abl-temp-0.001", "temperature init 0.001", ("weakclip.temperature_init=0.001",)),
    Ablation("abl-boundary", "boundary loss on (the paper's weight 1)", ("weakclip.loss.boundary_weight=1.0",)),
    Ablation("abl-no-coattention", "no co-attention (plain cosine matching)", ("weakclip.co_attention=false",)),
    Ablation("abl-dense-seeds", "dense argmax seeds instead of confident", ("weakclip.seeds.mode=dense",)),
    Ablation("abl-random-clip", "randomly initialised CLIP", ("clip.source=random",)),
)
"""The grid beside the synthetic default (N = 8, temperature init 0.1, co-attention, confident seeds, the
pretrained CLIP, and the boundary loss off: params.yaml says why); each row changes one thing."""
VARIANTS = (BASELINE, *ABLATIONS)
BOUNDARY_STUDY: tuple[Ablation, ...] = (
    BASELINE,
    next(variant for variant in ABLATIONS if variant.name == "abl-boundary"),
    Ablation("abl-boundary-w0.3", "boundary loss at weight 0.3", ("weakclip.loss.boundary_weight=0.3",)),
    Ablation("abl-boundary-size128", "boundary loss (weight 1), losses at 128 px (loss_size 128: the whole crop)",
             ("weakclip.loss.boundary_weight=1.0", "weakclip.loss.loss_size=128")),
    Ablation("abl-boundary-local", "boundary loss (weight 1), bilateral kernel sxy 20 (the default's 80 spans the "
             "whole 64-px loss map)", ("weakclip.loss.boundary_weight=1.0", "weakclip.loss.crf.bilateral_sxy=20.0")),
)
"""Issue #20 item 4: why the boundary loss costs points here: its weight, the loss map's size, the CRF kernel."""
GT_MASKS = ("weakclip.seeds.source=gt",)
CEILING_STUDY: tuple[Ablation, ...] = (
    BASELINE,
    next(variant for variant in ABLATIONS if variant.name == "abl-random-clip"),
    Ablation("abl-gt-masks", "trained on the GT masks instead of CAM seeds (an upper bound that uses GT, not a "
             "WSSS result)", GT_MASKS),
    Ablation("abl-gt-masks-random-clip", "trained on the GT masks, randomly initialised CLIP (upper bound, uses GT)",
             (*GT_MASKS, "clip.source=random")),
    Ablation("abl-gt-masks-no-coattention", "trained on the GT masks, no co-attention (upper bound, uses GT)",
             (*GT_MASKS, "weakclip.co_attention=false")),
)
"""Why a random CLIP does as well: how far each frozen CLIP takes WeakCLIP with perfect labels (its ceiling),
against how far it gets from the CAM seeds; and whether co-attention matters once the labels (and with them the
matching map co-attention refines) are perfect. The rows trained on GT masks are not WSSS results."""


@dataclass(frozen=True)
class AblationTable:
    """One table of docs/RESULTS.md: its variants (the baseline first), its metrics file and its title."""

    name: str
    variants: tuple[Ablation, ...]
    output: Path
    title: str


TABLES = (
    AblationTable("weakclip", VARIANTS, OUTPUT, "WeakCLIP ablations (DVC experiments, mean ± std over seeds)"),
    AblationTable("boundary", BOUNDARY_STUDY, REPO / "metrics" / "ablations_boundary.json",
                  "Boundary loss: weight, loss size, CRF kernel (DVC experiments, mean ± std over seeds)"),
    AblationTable("ceiling", CEILING_STUDY, REPO / "metrics" / "ablations_ceiling.json",
                  "Frozen CLIP: CAM seeds against GT masks, pretrained against random (DVC experiments, mean ± std "
                  "over seeds)"),
)
SEED_KEY = "weakclip.train.seed_offset"


def committed_dataset(repo: Path = REPO) -> str:
    """``dataset.name`` of the committed run (its ``dvc.lock``, the ``prepare`` stage's params): the dataset a bench
    table's runs were made on, which every bench table records so the summary renders it under that dataset's
    results only (``pipeline.summary.bench_files_of``)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
    params = lock["stages"].get("prepare", {}).get("params", {}).get("params.yaml", {})
    return str(params.get("dataset", {}).get("name", BENCH_DATASET_DEFAULT))


def experiment_name(variant: Ablation, seed_offset: int) -> str:
    return f"{variant.name}-s{seed_offset}"


def parse_experiment_name(name: str) -> tuple[str, int] | None:
    """``("abl-boundary", 2)`` for ``abl-boundary-s2``; None for a name this module did not give."""
    match = re.fullmatch(r"(.+)-s(\d+)", name)
    return (match.group(1), int(match.group(2))) if match else None


def dvc(*arguments: str) -> str:
    """``dvc <arguments>`` in the repository through the flows' runner (venv first on PATH, analytics off);
    its stdout, or ``CommandFailed`` naming the command and its output's tail."""
    return capture_command(dvc_command(*arguments), REPO)


def queue_and_run(variants: tuple[Ablation, ...], seed_offsets: tuple[int, ...], jobs: int,
                  poll_s: float = 15.0) -> None:
    """Queue every variant at every seed offset, then run the queue with ``jobs`` workers until it drains.

    Tasks that had failed before this call stay in ``dvc queue status`` (an interrupted earlier queue, say): they
    are not this queue's failures, so only tasks that failed after it was queued raise."""
    earlier_failures = failed_task_ids()
    queued: dict[str, tuple[str, ...]] = {}
    for variant in variants:
        for seed_offset in seed_offsets:
            overrides = (*variant.overrides, f"{SEED_KEY}={seed_offset}")
            name = experiment_name(variant, seed_offset)
            queued[name] = (*(argument for override in overrides for argument in ("-S", override)), TARGET)
            queue_experiment(name, queued[name])
            print(f"queued {name}: {' '.join(overrides)}", flush=True)
    wait_for_queue(jobs, poll_s, earlier_failures, queued=queued)


@dataclass(frozen=True)
class QueueState:
    """What ``dvc queue status`` says: tasks by status and how many workers are alive."""

    running_tasks: tuple[str, ...]  # the task lines listed Running
    queued: int
    failed: list[str]
    workers: int

    @property
    def running(self) -> int:
        return len(self.running_tasks)

    @property
    def drained(self) -> bool:
        return self.running == 0 and self.queued == 0

    @property
    def stalled(self) -> bool:
        """Tasks wait but no worker is left to run them (DVC's celery workers sometimes exit after a task)."""
        return self.queued > 0 and self.running == 0 and self.workers == 0


def parse_queue_status(status: str) -> QueueState:
    """``dvc queue status`` text → ``QueueState`` (task lines end in their status; the last line counts workers)."""
    lines = status.splitlines()

    def ending_in(word: str) -> list[str]:
        return [line for line in lines if re.search(rf"\s{word}\s*$", line)]

    workers = re.search(r"Worker status:\s*(\d+) active,\s*(\d+) idle", status)
    return QueueState(running_tasks=tuple(ending_in("Running")), queued=len(ending_in("Queued")),
                      failed=ending_in("Failed"), workers=int(workers.group(1)) + int(workers.group(2)) if workers else 0)


def task_id(status_line: str) -> str:
    """The task id that starts a ``dvc queue status`` task line (names repeat when a failed run is re-queued)."""
    return status_line.split()[0]


CREATED_COLUMN_START = re.compile(r"\d{1,2}:\d{2}|Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec")


def task_name(status_line: str) -> str | None:
    """The experiment name of a ``dvc queue status`` task line (its second column), ``None`` for an unnamed task
    (the second column is then the Created one: ``11:51 PM`` today, ``Aug 22, 2022`` before)."""
    fields = status_line.split()
    return fields[1] if len(fields) >= 4 and not CREATED_COLUMN_START.fullmatch(fields[1]) else None


def queue_worker_alive(repo: Path) -> bool:
    """Whether a DVC queue worker of ``repo`` still runs, from dvc-task's records of them (a record without a
    return code whose process lives; one being written counts as alive). ``dvc queue status``'s worker count
    cannot tell: it counts the workers that answer its inspect call, and one running an experiment may not
    answer in time (treeverse/dvc#10427)."""
    for record in sorted((repo / QUEUE_WORKER_RECORDS).glob("dvc-exp-worker-*.json")):
        try:
            info = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return True
        if not isinstance(info, dict):
            continue
        pid = info.get("pid")
        if info.get("returncode") is None and isinstance(pid, int) and pid > 0 and process_alive(pid):
            return True
    return False


def queue_experiment(name: str, arguments: tuple[str, ...]) -> None:
    """``dvc exp run --queue --name NAME ARGUMENTS`` (its ``-S`` overrides, then its target stage if any)."""
    dvc("exp", "run", "--queue", "--name", name, *arguments)


def requeue_lost_tasks(lost: tuple[str, ...], queued: dict[str, tuple[str, ...]],
                       requeued: set[str]) -> set[str]:
    """Tasks DVC lists as Running while no worker of the queue is alive were lost by it (a worker took the task,
    then shut down on its "empty queue" check: treeverse/dvc-task#77): ``dvc queue kill`` marks each Failed, its
    experiment entry is removed, and it is queued again with the arguments it was queued with. Returns the killed
    task ids (their Failed lines are not this queue's failures). A task this call did not queue, or one lost
    twice, raises naming it and the commands that clear it."""
    killed: set[str] = set()
    for line in lost:
        name = task_name(line)
        if name is None or name not in queued or name in requeued:
            reason = ("lost a second time" if name in requeued else
                      "not queued by this command" if name is not None else "an unnamed task")
            raise RuntimeError(
                f"DVC lists task {line.strip()!r} as Running but no queue worker is alive ({reason}): clear it "
                f"with `dvc queue kill {task_id(line)}` and `dvc exp remove {name or task_id(line)}`, then run "
                "this command again (finished experiments are kept)")
        dvc("queue", "kill", task_id(line))
        dvc("exp", "remove", name)
        queue_experiment(name, queued[name])
        killed.add(task_id(line))
        requeued.add(name)
        print(f"DVC's queue lost {name} (listed Running, no worker alive): queued it again", flush=True)
    return killed


def failed_task_ids() -> set[str]:
    """Ids of the tasks ``dvc queue status`` lists as failed now: taken before queueing, so that ``wait_for_queue``
    raises for this queue's failures only."""
    return {task_id(line) for line in parse_queue_status(dvc("queue", "status")).failed}


def start_workers(jobs: int, one_thread_each: bool) -> None:
    """``dvc queue start --jobs jobs``; ``one_thread_each``: every run at one thread (so that runs at once do not
    fight over the cores, and runs of different queues ran alike)."""
    environment = tool_environment()
    if one_thread_each:
        environment.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # The workers outlive `dvc queue start` and inherit its output: hand them /dev/null, or a captured
    # pipe stays open (and this call blocks) until the queue has drained.
    subprocess.run(dvc_command("queue", "start", "--jobs", str(jobs)), cwd=REPO, env=environment,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)


def wait_for_queue(jobs: int, poll_s: float, earlier_failures: frozenset[str] | set[str] = frozenset(),
                   stalled_polls_before_restart: int = 2, one_thread_each: bool | None = None,
                   queued: dict[str, tuple[str, ...]] | None = None) -> None:
    """Start ``jobs`` queue workers and wait until the queue has drained; a failed experiment raises, naming it,
    unless its task id is one of ``earlier_failures`` (tasks that had failed before this queue was filled).
    ``one_thread_each`` (default: when ``jobs`` > 1): ``start_workers``'.

    Workers that exit with tasks still queued (seen with DVC's celery queue on long queues) are started again
    once the queue has looked stalled for ``stalled_polls_before_restart`` polls in a row, so an overnight
    queue does not sit idle. Tasks listed Running with nothing queued and no worker process alive for as many
    polls were lost by DVC's queue (seen in the test suite: the wait then never ended): ``queued`` ({experiment
    name: the arguments it was queued with}) lets ``requeue_lost_tasks`` queue them again, once each."""
    one_thread = jobs > 1 if one_thread_each is None else one_thread_each
    start_workers(jobs, one_thread)
    stalled_polls = lost_polls = 0
    requeued: set[str] = set()
    killed: set[str] = set()
    while True:
        state = parse_queue_status(dvc("queue", "status"))
        if state.drained:
            break
        stalled_polls = stalled_polls + 1 if state.stalled else 0
        lost_polls = (lost_polls + 1 if state.running and not state.queued and not queue_worker_alive(REPO)
                      else 0)
        if stalled_polls >= stalled_polls_before_restart:
            print(f"{state.queued} experiments queued and no worker left: starting {jobs} again", flush=True)
            start_workers(jobs, one_thread)
            stalled_polls = 0
        if lost_polls >= stalled_polls_before_restart:
            killed |= requeue_lost_tasks(state.running_tasks, queued or {}, requeued)
            start_workers(jobs, one_thread)
            lost_polls = 0
        print(f"{state.running + state.queued} experiments queued or running", flush=True)
        time.sleep(poll_s)
    # The drained queue's own status lists its failed tasks: no second `dvc queue status`.
    failed = [line for line in state.failed if task_id(line) not in earlier_failures | killed]
    if failed:
        raise RuntimeError("failed experiments (see `dvc queue logs <name>`):\n" + "\n".join(failed))


@dataclass(frozen=True)
class FinishedRun:
    """One finished experiment of ``dvc exp show --json``: its commit, the params it ran with (``params.yaml``)
    and the data of each of its readable metrics files (an unreadable one is left out)."""

    rev: str
    params: dict[str, Any]
    metrics: dict[str, dict[str, Any]]


def finished_experiments(exp_show: list[dict[str, Any]]) -> tuple[dict[str, FinishedRun], set[str]]:
    """``({name: FinishedRun} of the finished experiments, names of every listed experiment})`` from ``dvc exp
    show --json`` (newest rev with metrics wins). Finished: the executor reports success (or is gone) and the run
    has metrics. A queued experiment has none; a running one lists the committed metrics it has not rewritten
    yet; a failed one carries an ``error`` and the metrics of the commit it started from (the baseline's, not its
    own): none counts, or a variant whose runs failed would count the baseline's figure once per failed seed."""
    finished: dict[str, FinishedRun] = {}
    listed: set[str] = set()
    for baseline in exp_show:
        for experiment in baseline.get("experiments") or []:
            name = experiment.get("name")
            if not name:
                continue
            listed.add(name)
            executor = experiment.get("executor")
            if executor is not None and executor.get("state") != "success":
                continue
            for revision in experiment.get("revs") or []:
                data = revision.get("data") or {}
                if revision.get("error") or name in finished or not data.get("metrics"):
                    continue
                finished[name] = FinishedRun(
                    rev=str(revision.get("rev")),
                    params=((data.get("params") or {}).get("params.yaml") or {}).get("data") or {},
                    metrics={path: entry["data"] for path, entry in data["metrics"].items()
                             if isinstance(entry, dict) and isinstance(entry.get("data"), dict)})
    return finished, listed


def experiment_runs(exp_show: list[dict[str, Any]],
                    metrics_file: str = WEAKCLIP_METRICS) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{experiment name: (its commit, data of metrics_file)}`` of the finished experiments that hold it
    (``finished_experiments``)."""
    finished, _ = finished_experiments(exp_show)
    return {name: (run.rev, run.metrics[metrics_file]) for name, run in finished.items()
            if metrics_file in run.metrics}


def experiment_metrics(exp_show: list[dict[str, Any]],
                       metrics_file: str = WEAKCLIP_METRICS) -> dict[str, dict[str, Any]]:
    """``{experiment name: data of metrics_file}`` from ``dvc exp show --json`` (newest rev wins)."""
    return {name: metrics for name, (_, metrics) in experiment_runs(exp_show, metrics_file).items()}


COMMIT = re.compile(r"[0-9a-f]{40}")


def commits_with_experiments(repo: Path) -> list[str]:
    """The full hashes of every commit that experiments hang off (``dvc exp list --all-commits``: a baseline per
    line ending in ``:``, a branch name or a short hash), in the order DVC lists them."""
    commits: list[str] = []
    for line in dvc("exp", "list", "--all-commits").splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            resolved = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{line[:-1]}^{{commit}}"],
                                      cwd=repo, capture_output=True, text=True, check=False)
            commit = resolved.stdout.strip()
            if resolved.returncode == 0 and commit not in commits:  # else a name git cannot resolve: no commit
                commits.append(commit)
    return commits


def experiments_of_commits(commits: list[str]) -> list[dict[str, Any]]:
    """``dvc exp show --json`` of the experiments of ``commits`` only (``[]`` for none). ``--all-commits`` reads the
    params and metrics of every commit of the history to list the few that have experiments: 44 s for 398
    commits here, where this reads only those."""
    if not commits:
        return []
    return json.loads(dvc("exp", "show", "--json", *(argument for commit in commits for argument in ("--rev", commit))))


def baselines_with_these_outputs(exp_show: list[dict[str, Any]], repo: Path, lock: dict[str, Any],
                                 stages: tuple[str, ...]) -> tuple[list[dict[str, Any]], list[str]]:
    """The entries of ``dvc exp show --json --all-commits`` whose baseline commit's ``dvc.lock`` names the same
    outputs of ``stages`` as ``lock`` (the workspace's), and the commits left out.

    Why: the grid's experiments hang off whichever commit was HEAD when each was queued, and a table may gather
    experiments queued across commits; that is sound only while those commits' committed runs are byte for byte
    the same (code changes that leave every output as it was). After an output-changing commit the older
    experiments ran another chain (other CAM seeds, another CLIP, another WeakCLIP code), and mixing them into
    the new table would compare runs of two benchmarks. ``stages``: the experiments' target and every stage it
    depends on. Entries that are not a commit (``workspace``) are kept: they are this checkout. Commits without
    experiments (most of the history) are dropped unread: they add nothing to the table."""
    wanted = out_hashes(lock, stages)
    kept: list[dict[str, Any]] = []
    left_out: list[str] = []
    for baseline in exp_show:
        rev = str(baseline.get("rev") or "")
        if not COMMIT.fullmatch(rev):
            kept.append(baseline)
            continue
        if not baseline.get("experiments"):
            continue
        shown = subprocess.run(["git", "show", f"{rev}:dvc.lock"], cwd=repo, capture_output=True, text=True)
        if shown.returncode == 0 and out_hashes(read_lock(shown.stdout), stages) == wanted:
            kept.append(baseline)
        else:
            left_out.append(rev)
    return kept, left_out


def experiments_of_this_benchmark(targets: list[str]) -> list[dict[str, Any]]:
    """``dvc exp show --json`` entries of every commit with experiments whose committed run names the outputs
    ``dvc.lock`` names for ``targets`` and every stage before them (``baselines_with_these_outputs``): the queue's
    experiments hang off the commit that was HEAD when each was queued. The commits left out are named."""
    stages = tuple(read_stage_graph(REPO).select(targets).names())
    exp_show, left_out = baselines_with_these_outputs(experiments_of_commits(commits_with_experiments(REPO)), REPO,
                                                      read_lock((REPO / "dvc.lock").read_text(encoding="utf-8")),
                                                      stages)
    if left_out:
        print(f"left out the experiments of {len(left_out)} commit(s) whose committed outputs of {', '.join(stages)} "
              f"differ from dvc.lock's (another benchmark): {', '.join(rev[:12] for rev in left_out)}")
    return exp_show


def mean_and_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); no std from a single value."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1))


VAL_MIOU = "val_miou"
"""Key of the held-out figure (``bench.heldout``: val split, all classes, the reference's evaluation) that
``collect --heldout`` adds to each experiment's metrics; ``VAL_LABELLED_MIOU`` the same images restricted to
their labels + background."""
VAL_LABELLED_MIOU = "val_labelled_miou"


def values_by_variant(by_name: dict[str, dict[str, Any]], key: str) -> dict[str, dict[int, float]]:
    """``{variant name: {seed offset: metrics[key]}}`` over the experiments this module named."""
    by_variant: dict[str, dict[int, float]] = {}
    for name, metrics in by_name.items():
        parsed = parse_experiment_name(name)
        if parsed is not None and isinstance(metrics.get(key), (int, float)):
            by_variant.setdefault(parsed[0], {})[parsed[1]] = float(metrics[key])
    return by_variant


def ablation_rows(by_name: dict[str, dict[str, Any]], cam_miou: float,
                  variants: tuple[Ablation, ...] = VARIANTS) -> list[dict[str, Any]]:
    """One row per variant that ran at least one seed: mean ± std of WeakCLIP mIoU over its seeds, the seeds'
    values, the difference from the baseline, and the mean gain over the CAM seeds; where the experiments were
    scored on the held-out val split (``VAL_MIOU``), the same for that figure beside.

    The difference from the baseline is paired: the mean, over the seed offsets both ran, of variant minus
    baseline at the same offset. A seed offset moves every variant alike (its WeakCLIP init and batch order are
    the same), so pairing removes that shared noise, and a variant run at fewer seeds than the baseline (the
    baseline extended with ``--from-seed``) is compared with the baseline's runs at its own seeds only."""
    train = values_by_variant(by_name, "miou")
    val = values_by_variant(by_name, VAL_MIOU)
    val_labelled = values_by_variant(by_name, VAL_LABELLED_MIOU)

    def paired_difference(seeds: dict[int, float], baseline: dict[int, float]) -> float | None:
        shared = sorted(set(seeds) & set(baseline))
        if not shared:
            return None
        return round(100 * sum(seeds[offset] - baseline[offset] for offset in shared) / len(shared), 1) + 0.0

    def per_seed(seeds: dict[int, float]) -> str:
        return " / ".join(f"{100 * seeds[offset]:.1f}" for offset in sorted(seeds))

    reference, val_reference = train.get(BASELINE.name, {}), val.get(BASELINE.name, {})
    rows = []
    for variant in variants:
        seeds = train.get(variant.name)
        if not seeds:
            continue
        values = [seeds[offset] for offset in sorted(seeds)]
        mean, std = mean_and_std(values)
        row: dict[str, Any] = {
            "setting": variant.setting,
            "experiments": f"{variant.name}-s{{{','.join(str(offset) for offset in sorted(seeds))}}}",
            "seeds": len(values),
            "weakclip_miou (mean)": mean,
            "± std (points)": None if std is None else round(100 * std, 1),
            "per seed (points)": per_seed(seeds),
            "vs baseline (points)": paired_difference(seeds, reference),
            "gain over CAM seeds (points)": round(100 * (mean - cam_miou), 1),
        }
        val_seeds = val.get(variant.name)
        if val_seeds:
            val_mean, val_std = mean_and_std(list(val_seeds.values()))
            labelled = val_labelled.get(variant.name)
            row.update({
                "val_miou, all classes (mean)": val_mean,
                "val ± std (points)": None if val_std is None else round(100 * val_std, 1),
                "val per seed (points)": per_seed(val_seeds),
                "val vs baseline (points)": paired_difference(val_seeds, val_reference),
                "val_miou, labels given (mean)": mean_and_std(list(labelled.values()))[0] if labelled else None,
            })
        rows.append(row)
    return rows


def carry_previous_rows(rows: list[dict[str, Any]], previous_rows: list[dict[str, Any]],
                        variants: tuple[Ablation, ...] = VARIANTS) -> tuple[list[dict[str, Any]], list[str]]:
    """``rows`` plus the rows of an earlier queue (``previous_rows``, the committed table) whose variants did
    not run this time, in the table's order; and the carried variants' names.

    Why: a queue may re-run part of a table (``--only``), and this workspace's ``dvc exp show`` holds only its
    own experiments. An earlier row is comparable only if the baseline reproduced seed for seed (one thread per
    run is deterministic on one machine), so rows are carried only when both baselines show the same per-seed
    values; otherwise none is, and the table says which variants did not run.
    """
    current = {row["setting"]: row for row in rows}
    previous = {row["setting"]: row for row in previous_rows}
    baselines = [table.get(BASELINE.setting, {}).get("per seed (points)") for table in (current, previous)]
    if baselines[0] is None or baselines[0] != baselines[1]:
        return rows, []
    carried = [variant for variant in variants if variant.setting not in current and variant.setting in previous]
    merged = {**current, **{variant.setting: previous[variant.setting] for variant in carried}}
    ordered = [merged[variant.setting] for variant in variants if variant.setting in merged]
    return ordered, [variant.name for variant in carried]


def add_heldout_scores(runs: dict[str, tuple[str, dict[str, Any]]],
                       variants: tuple[Ablation, ...]) -> dict[str, dict[str, Any]]:
    """Each of ``variants``' experiments' metrics with its held-out val scores added (``bench.heldout``,
    about 20 s an experiment on 2 cores): ``VAL_MIOU`` over all classes, ``VAL_LABELLED_MIOU`` with the labels."""
    from bench.heldout import score_revision  # torch and the model code: only when asked for

    names = {variant.name for variant in variants}
    scored: dict[str, dict[str, Any]] = {}
    for name, (rev, metrics) in sorted(runs.items()):
        parsed = parse_experiment_name(name)
        if parsed is None or parsed[0] not in names:
            continue
        scores = score_revision(REPO, rev)
        print(f"{name}: val mIoU {scores.unrestricted_miou}, with the labels {scores.labelled_miou}", flush=True)
        scored[name] = {**metrics, VAL_MIOU: scores.unrestricted_miou, VAL_LABELLED_MIOU: scores.labelled_miou}
    return scored


def run_command(table: AblationTable) -> str:
    """The command that queues ``table``'s experiments (``--table`` is needed for all but the default table)."""
    chosen = "" if table is TABLES[0] else f" --table {table.name}"
    return f"python -m bench.ablations run{chosen} --seeds N"


def collect(table: AblationTable = TABLES[0], heldout: bool = False) -> Path:
    """Write ``table``'s metrics file from ``dvc exp show --json`` and the committed metrics; ``heldout``: also
    score each experiment's model on the val split (``bench.heldout``), from this repository's DVC cache."""
    runs = experiment_runs(experiments_of_this_benchmark([TARGET]))
    by_name = add_heldout_scores(runs, table.variants) if heldout else {name: m for name, (_, m) in runs.items()}
    cam = json.loads(CAM_METRICS.read_text(encoding="utf-8"))
    rows = ablation_rows(by_name, cam["miou"], table.variants)
    if not rows:
        raise RuntimeError("no ablation experiment found in `dvc exp show`; run `python -m bench.ablations run`")
    committed = json.loads((REPO / WEAKCLIP_METRICS).read_text(encoding="utf-8"))
    previous = json.loads(table.output.read_text(encoding="utf-8"))["rows"] if table.output.is_file() else []
    rows, carried = carry_previous_rows(rows, previous, table.variants)
    not_run = [variant.name for variant in table.variants if variant.setting not in {row["setting"] for row in rows}]
    write_json(table.output, {
        "title": table.title,
        "dataset": committed_dataset(),
        "description": (
            f"Each row is `dvc exp run -S <override> -S {SEED_KEY}=<s> weakclip_train` on the committed baseline, "
            f"once per seed offset s (`{run_command(table)}`): WeakCLIP's own init, batch order, "
            "augmentation and dropout change; the CLIP and the CAM seeds are the committed ones "
            f"(cam mIoU {100 * cam['miou']:.1f}). WeakCLIP train-split mIoU, single scale, no CRF; mean ± sample "
            "std over the seeds; 'vs baseline' is the mean of the seed-for-seed differences from the baseline over "
            "the seed offsets both ran; every row ran in a queue of two at one thread per run, and the tables share the "
            "experiments of the variants they both list (the baseline's among them). "
            f"The committed run (seed offset 0, the chain's own threads) scored {100 * committed['miou']:.1f}."
            + (" The val columns score the same models on the held-out val split as the reference's evaluation "
               "hook does (`python -m bench.heldout`): all classes, single scale, no CRF, no threshold; 'labels "
               "given' restricts each val image to its labels + background." if heldout else "")
            + (f" Carried from the previous queue, whose baseline this queue reproduced seed for seed: "
               f"{', '.join(carried)}." if carried else "")
            + (f" Not run: {', '.join(not_run)}." if not_run else "")),
        "split": committed.get("split", "train"),
        "threshold_chosen_with_gt": False,
        "rows": rows,
    })
    # The file is a declared dep of summary (dvc.yaml): re-run that one stage now so RESULTS.md and dvc.lock
    # agree with the new table.
    dvc("repro", "--force", "--single-item", "summary")
    return table.output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run", "collect"])
    parser.add_argument("--seeds", type=int, default=3, help="seed offsets 1..N per variant (default 3)")
    parser.add_argument("--from-seed", type=int, default=1, metavar="K",
                        help="run seed offsets K..N only: adds seeds to a table already run for 1..K-1 "
                             "(collect counts every seed it finds; default 1)")
    parser.add_argument("--jobs", type=int, default=2, help="experiments run at the same time (dvc queue start -j)")
    parser.add_argument("--table", choices=[table.name for table in TABLES], default=TABLES[0].name,
                        help="weakclip: the ablation grid (metrics/ablations_weakclip.json); boundary: the boundary "
                             "loss study (metrics/ablations_boundary.json); ceiling: CAM seeds against GT masks, "
                             "pretrained against random CLIP (metrics/ablations_ceiling.json)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        choices=sorted({variant.name for table in TABLES for variant in table.variants}),
                        help="run these variants of the table only (default: all of them, the baseline included)")
    parser.add_argument("--heldout", action="store_true",
                        help="also score every experiment's WeakCLIP on the held-out val split over all classes, "
                             "the reference's evaluation (bench.heldout; about 20 s an experiment)")
    arguments = parser.parse_args(argv)
    table = next(table for table in TABLES if table.name == arguments.table)
    if arguments.command == "run":
        if arguments.seeds < 1:
            parser.error("--seeds: at least 1")
        if not 1 <= arguments.from_seed <= arguments.seeds:
            parser.error(f"--from-seed: between 1 and --seeds ({arguments.seeds})")
        variants = tuple(v for v in table.variants if not arguments.only or v.name in arguments.only)
        if not variants:
            parser.error(f"--only: none of {arguments.only} is in the {table.name} table")
        queue_and_run(variants, tuple(range(arguments.from_seed, arguments.seeds + 1)), arguments.jobs)
    print(f"ablations: {collect(table, arguments.heldout)}")


if __name__ == "__main__":
    main()

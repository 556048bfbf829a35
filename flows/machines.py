"""Stages on other machines: the run state a coordinator sends, what a worker does with it, the lock merge.

The coordinator (the ``chain`` flow with ``dispatch="pools"``) owns one git clone
and its ``dvc.lock``. Each stage run it sends carries a :class:`RunState`: the
clone's commit, the text of every params file (so uncommitted params travel),
the ``dvc.lock`` text the stage runs against, and the bytes of the
``cache: false`` files the stage depends on (DVC never pushes those). A worker,
in its own clone with its own DVC cache (:func:`run_stage_on_worker`):

1. refuses in one line if its clone is dirty (outside ``dvc.lock``, params and
   stage outputs) or does not know the commit after a ``git fetch``;
2. checks the commit out, writes the received params files and ``dvc.lock``;
3. writes the carried ``cache: false`` files (the stage's deps and its own outputs;
   a carried folder replaces the clone's copy whole) and ``dvc pull``s exactly the
   cached deps of the stage, by the hashes of the received lock; a stage that the
   lock names up to date but whose outputs this clone lacks gets them pulled too;
4. ``dvc repro --single-item <stage>`` (which skips a stage already up to date), then checks that every dep made by an
   upstream stage has the hash the received lock names (else it fails: the
   stage ran on inputs the coordinator did not choose);
5. ``dvc push``es the stage's cached outputs and returns its ``dvc.lock``
   entry, the bytes of its ``cache: false`` outputs and its metrics.

The coordinator merges each entry into its ``dvc.lock`` (:func:`merge_lock_entry`)
and writes the returned files into its workspace (each returned folder replacing its
copy whole); the next stages get the merged
lock. At the end it ``dvc pull``s and checks ``dvc status``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flows.dag import StageGraph, StageSpec, read_stage_graph
from flows.dvc_cli import (CommandFailed, capture_command, dvc_command, mask_url_passwords, run_command,
                           tool_environment)
from flows.stage_run import flat_params
from weakclip_core.artifacts.atomic import write_text
from weakclip_core.config.params import parse_params_text
from weakclip_core.config.schema import ConfigError

CHAIN_LOCK = Path(".dvc") / "tmp" / "weakclip-chain.lock"
CLONE_LOCK = Path(".dvc") / "tmp" / "weakclip-stage.lock"


class Refused(RuntimeError):
    """A run that must not start; the message is one line that says what to do."""


class RemoteFailed(RuntimeError):
    """``dvc pull``/``dvc push`` against the DVC remote failed; the message names the remote."""


# --------------------------------------------------------------------------- run state


@dataclass(frozen=True)
class RunState:
    """What one stage run on another machine runs against (JSON-able: it travels as a flow parameter)."""

    commit: str
    params: dict[str, str]  # params file → its text on the coordinator
    lock: str | None  # the coordinator's dvc.lock text, None when it has none yet
    files: dict[str, str] = field(default_factory=dict)  # cache: false deps → base64 bytes
    coordinator: str = ""  # "<host>:<clone>", so a worker never runs in the coordinator's own clone

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(data: dict[str, Any]) -> RunState:
        return RunState(**data)


def git(args: list[str], cwd: Path, timeout: float = 120) -> str:
    completed = subprocess.run(
        ["git", *args], cwd=cwd, env=tool_environment(), capture_output=True, text=True, timeout=timeout, check=False
    )
    if completed.returncode != 0:
        raise CommandFailed(["git", *args], cwd, completed.returncode, completed.stderr.splitlines()[-20:])
    return completed.stdout


def _under(path: str, roots: set[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def uncommitted_files(root: Path) -> list[str]:
    """Tracked files changed since HEAD (a rename's new name), as ``git status --porcelain`` lists them."""
    return sorted(path for line in git(["status", "--porcelain", "--untracked-files=no"], root).splitlines()
                  if (path := line[3:].split(" -> ")[-1].strip().strip('"')))


def dirty_paths(root: Path, graph: StageGraph, extra_allowed: set[str]) -> list[str]:
    """Tracked files changed since HEAD that are not ``dvc.lock``, ``extra_allowed``, a stage output or a ``.gitignore``."""
    allowed = {"dvc.lock", *extra_allowed}
    outputs = {out for stage in graph.stages for out in stage.outs}
    # .gitignore files: DVC itself adds its outputs to them when a stage first runs.
    return [path for path in uncommitted_files(root)
            if path not in allowed and not _under(path, outputs) and Path(path).name != ".gitignore"]


def untracked_in_deps(root: Path, graph: StageGraph) -> list[str]:
    """Files inside the graph's in-repository deps that git does not track and does not ignore (a new module not
    yet ``git add``ed in a code folder a stage depends on): DVC hashes them into the stage's dep, but a clone of
    the commit lacks them, so a worker runs other code than the dep hash names."""
    made = {path for stage in graph.stages for path in (*stage.outs, *stage.metrics, *stage.uncached)}
    deps = sorted({dep for stage in graph.stages for dep in stage.deps
                   if not outside_repository(dep) and not _under(dep, made)})  # an upstream output: the chain's
    # Code: deps git tracks files under. A data folder a user keeps inside the repository (dataset.source:
    # data/my_dataset, untracked) is an external input, carried and checked as one, not uncommitted code.
    tracked = git(["ls-files", "--", *deps], root).splitlines() if deps else []
    code_deps = [dep for dep in deps if any(_under(path, {dep}) for path in tracked)]
    if not code_deps:
        return []
    listed = git(["ls-files", "--others", "--exclude-standard", "--directory", "--", *code_deps], root)
    return sorted(path for line in listed.splitlines() if (path := line.strip()) and not _under(path, made))


def shown_paths(paths: list[str], shown: int = 5) -> str:
    """Up to ``shown`` of ``paths``, space-separated, then how many more: a refusal stays one readable line."""
    return " ".join(paths[:shown]) + (f" (and {len(paths) - shown} more)" if len(paths) > shown else "")


def params_changed_since_commit(root: Path, files: list[str], shown: int = 6) -> list[str]:
    """``file: key committed -> here`` for each params value of ``files`` that differs from the commit's (at most
    ``shown``, then how many more): what the chain's uncommitted params change, for its log. A chain's ``-S``
    overrides stay in the clone's params files after it (as ``dvc exp run -S`` leaves the workspace), so a later
    chain on that clone without ``-S`` runs them too: it says so instead of silently."""
    changes: list[str] = []
    for relative in files:
        path = root / relative
        if not path.is_file():
            continue
        try:  # read as DVC writes them (YAML 1.2: `3e-05` is a number), or each such value shows as changed
            committed = parse_params_text(git(["show", f"HEAD:{relative}"], root), f"HEAD:{relative}") or {}
        except (CommandFailed, ConfigError):
            committed = {}
        current = parse_params_text(path.read_text(encoding="utf-8"), path) or {}
        if not isinstance(committed, dict) or not isinstance(current, dict):
            continue
        before, after = flat_params(committed), flat_params(current)
        for key in sorted(before.keys() | after.keys()):
            old, new = before.get(key, "(absent)"), after.get(key, "(absent)")
            if old != new:
                changes.append(f"{relative}: {key} {old} -> {new}")
    return changes[:shown] + ([f"and {len(changes) - shown} more"] if len(changes) > shown else [])


def params_files(graph: StageGraph) -> list[str]:
    return sorted({path for stage in graph.stages for path in stage.params_files} or {"params.yaml"})


def _read_tree(root: Path, relative: str) -> dict[str, str]:
    """``{path: base64}`` for a file, or for every file under a folder."""
    path = root / relative
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    return {p.relative_to(root).as_posix(): base64.b64encode(p.read_bytes()).decode("ascii") for p in files}


def carried_roots(stage: StageSpec, graph: StageGraph) -> list[str]:
    """The files and folders a run of ``stage`` carries (DVC never pushes them): the ``cache: false`` outputs of
    upstream stages that it depends on, and its own ``cache: false`` outputs. Its own travel so that a worker
    whose clone lacks them can tell a stage that is up to date from one that must run (``outputs_only_stale``);
    a stage that runs replaces them."""
    by_name = graph.by_name()
    wanted = {out for parent in stage.upstream for out in by_name[parent].uncached}
    roots = {out if _under(dep, {out}) else dep
             for dep in stage.deps for out in wanted if _under(dep, {out}) or _under(out, {dep})}
    return sorted(roots | set(stage.uncached))


def carried_inputs(stage: StageSpec, graph: StageGraph, root: Path) -> dict[str, str]:
    """What ``carried_roots`` names, as ``root`` holds it (a root ``root`` lacks is not carried)."""
    files: dict[str, str] = {}
    for carried in carried_roots(stage, graph):
        files.update(_read_tree(root, carried))
    return files


def check_run_size(stage_name: str, parameters: dict[str, Any], limit_bytes: int) -> None:
    """Refuse, in one line, a stage run whose flow-run parameters (JSON: the run state with its dvc.lock, params
    and carried files) exceed ``limit_bytes``, the most a Prefect server stores per flow run (its
    ``PREFECT_SERVER_API_MAX_PARAMETER_SIZE``, 512 KiB by default; 0 = no limit). Past it the server answers
    422 to every attempt; this says which files to make cached instead."""
    size = len(json.dumps(parameters))
    if not limit_bytes or size <= limit_bytes:
        return
    files = (parameters.get("run_state") or {}).get("files") or {}
    largest = sorted(files, key=lambda path: -len(files[path]))[:3]
    raise Refused(
        f"stage {stage_name!r}: its run carries {size} bytes (dvc.lock, params and the cache: false files "
        f"{', '.join(largest) or 'none'}), more than the {limit_bytes} bytes of parameters a Prefect server stores "
        "per flow run (PREFECT_SERVER_API_MAX_PARAMETER_SIZE); make the large cache: false outputs cached (drop "
        "cache: false in dvc.yaml) so they travel through the DVC remote"
    )


def write_files(root: Path, files: dict[str, str], replaced: list[str] | tuple[str, ...] = ()) -> None:
    """Write ``files`` (``{path: base64}``) under ``root``. Each folder of ``replaced`` first loses every file that
    ``files`` does not hold, so it ends as the sender's copy and not a mix with what an earlier run left there (a
    dvclive folder after a run that logged fewer metrics), which ``dvc status`` would call modified."""
    for folder in replaced:
        if (root / folder).is_dir():
            for existing in sorted((root / folder).rglob("*")):
                if existing.is_file() and existing.relative_to(root).as_posix() not in files:
                    existing.unlink()
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".carried.tmp")
        tmp.write_bytes(base64.b64decode(data))
        os.replace(tmp, path)


def apply_param_overrides(root: Path, overrides: list[str]) -> None:
    """``[file:]key.path=value`` overrides on the coordinator's params files, read and applied by DVC's own code for
    ``dvc exp run -S`` (Hydra's grammar: a key the file lacks is refused, ``+key=value`` adds one, ``~key``
    removes one; comments kept). They used to be applied by hand: a misspelt key was silently added (and, with
    ``--commit``, committed), ``+key`` written literally. Refused in one line naming the override.

    The edited files are then uncommitted params: they travel with every stage run.
    """
    from dvc.exceptions import InvalidArgumentError
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides

    for override in overrides:
        if "=" not in override and not override.startswith("~"):
            raise Refused(f"override {override!r}: expected [file:]key.path=value, e.g. seg.model=deeplabv3plus "
                          "(as dvc exp run -S takes it)")
    for relative, file_overrides in to_path_overrides(overrides).items():
        path = root / relative
        if not path.is_file():
            raise Refused(f"override {file_overrides[0]!r}: params file {path} does not exist")
        try:
            apply_overrides(str(path), file_overrides)
        except InvalidArgumentError as error:
            reason = " ".join(str(error.__cause__ or error).split())
            raise Refused(f"override {' '.join(file_overrides)!r} on {path}: {reason} (read as dvc exp run -S "
                          "reads it)") from None


def outside_repository(path: str) -> bool:
    """Whether a dep path, repository-relative (``../data``, as the stage graph gives it) or absolute (as ``dvc
    status`` prints one given so), lies outside the repository."""
    return path == ".." or path.startswith(("../", "/"))


def external_deps(graph: StageGraph) -> list[str]:
    """The deps outside the repository (``dataset.source``, ``clip.weights``, ``cam.arch.pretrained``, ...:
    absolute paths in params.yaml, repository-relative ``../…`` here). DVC hashes them where a stage runs and
    where ``dvc status`` runs, so the coordinator and every worker need the same file at the same path."""
    return sorted({dep for stage in graph.stages for dep in stage.deps if outside_repository(dep)})


def check_external_deps_here(root: Path, graph: StageGraph) -> None:
    """Refuse, before any stage is sent, a chain whose external inputs the coordinator lacks: its closing
    ``dvc status`` hashes them too, so the chain would fail only after every stage had run."""
    missing = [dep for dep in external_deps(graph) if not (root / dep).exists()]
    if missing:
        shown = ", ".join(str((root / dep).resolve()) for dep in missing[:3])
        raise Refused(
            f"{root}: the chain's external input(s) {shown}{' ...' if len(missing) > 3 else ''} do not exist on the "
            "coordinator; the coordinator checks every stage's deps with dvc status at the end, so it needs the same "
            "files at the same paths as the workers: copy them here first"
        )


def coordinator_id(root: Path) -> str:
    return f"{socket.gethostname()}:{root.resolve()}"


def capture_run_state(root: Path, graph: StageGraph) -> RunState:
    """The coordinator's state: refuses (one line) when code or dvc.yaml has uncommitted changes."""
    carried = params_files(graph)
    dirty = dirty_paths(root, graph, set(carried))
    untracked = [
        line[3:] for line in git(["status", "--porcelain"], root).splitlines()
        if line.startswith("?? ") and line[3:].rstrip("/") in {"dvc.yaml", *carried}
    ]
    untracked += [path for path in untracked_in_deps(root, graph) if path not in untracked]
    if dirty or untracked:
        paths = dirty + untracked
        add = " ".join(paths) if len(paths) <= 5 else "them"
        raise Refused(
            f"{root}: uncommitted changes in {shown_paths(paths)}: the workers run committed code; commit them "
            f"first (git add {add} && git commit) and push the commit where the workers fetch from"
        )
    lock_path = root / "dvc.lock"
    return RunState(
        commit=git(["rev-parse", "HEAD"], root).strip(),
        params={path: (root / path).read_text() for path in carried if (root / path).is_file()},
        lock=lock_path.read_text() if lock_path.is_file() else None,
        coordinator=coordinator_id(root),
    )


# --------------------------------------------------------------------------- locks


@contextmanager
def held_file_lock(path: Path, what: str, wait_s: float = 0.0) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (released when the process dies); ``Refused`` if busy after ``wait_s``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("a+")
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown"
                    raise Refused(f"{what} ({holder}); wait for it to end or cancel it") from None
                time.sleep(1.0)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
        handle.flush()
        yield
    finally:
        handle.close()


@contextmanager
def chain_lock(root: Path) -> Iterator[None]:
    """One chain at a time per coordinator clone: a second one is refused in one line."""
    with held_file_lock(root / CHAIN_LOCK, f"another chain is already running on {root}"):
        yield


# --------------------------------------------------------------------------- lock entries


def read_lock(text: str | None) -> dict[str, Any]:
    """A ``dvc.lock`` text parsed as DVC parses it (YAML 1.2, ruamel): PyYAML's YAML 1.1 turned DVC's unquoted
    ``off`` / ``yes`` into booleans and ``1:30`` into 90, and the merged lock then disagreed with params.yaml."""
    from dvc.utils.serialize import parse_yaml

    data = parse_yaml(text, "dvc.lock") if text else None
    return data if isinstance(data, dict) else {"schema": "2.0", "stages": {}}


def merge_lock_entry(root: Path, stage_name: str, entry: dict[str, Any], guard: threading.Lock) -> str:
    """Put one stage's entry into ``root/dvc.lock`` (atomically); returns the new lock text."""
    from dvc.utils.serialize import dumps_yaml

    with guard:
        path = root / "dvc.lock"
        lock = read_lock(path.read_text() if path.is_file() else None)
        lock.setdefault("schema", "2.0")
        lock.setdefault("stages", {})[stage_name] = entry
        text = dumps_yaml(lock)  # DVC's own YAML 1.2 writer, as DVC writes the file
        tmp = path.with_name("dvc.lock.merge.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return text


def out_hashes(lock: dict[str, Any], stages: tuple[str, ...]) -> dict[str, str]:
    """``{output path: md5}`` of ``stages``' outputs in a parsed ``dvc.lock`` (stages it lacks add nothing)."""
    found: dict[str, str] = {}
    for name in stages:
        for out in (lock.get("stages", {}).get(name) or {}).get("outs", []) or []:
            if "md5" in out:
                found[out["path"]] = out["md5"]
    return found


def check_inputs_match(stage: StageSpec, sent_lock: dict[str, Any], entry: dict[str, Any]) -> None:
    """Every dep made by an upstream stage must have the hash the coordinator's lock names for that output."""
    expected = out_hashes(sent_lock, stage.upstream)
    wrong = [
        f"{dep['path']} ran with md5 {dep.get('md5')}, the coordinator's dvc.lock names {expected[dep['path']]}"
        for dep in entry.get("deps", []) or []
        if dep.get("path") in expected and dep.get("md5") != expected[dep["path"]]
    ]
    if wrong:
        raise RuntimeError(f"stage {stage.name!r} ran on inputs its lock entry does not name: " + "; ".join(wrong))


# --------------------------------------------------------------------------- worker side


def worker_clone(repo_dir: str | os.PathLike[str]) -> Path:
    """The worker's clone: ``repo_dir``, where ``"."`` means ``$WEAKCLIP_PROJECT`` (else the working folder)."""
    if str(repo_dir) in ("", "."):
        return Path(os.environ.get("WEAKCLIP_PROJECT") or ".").resolve()
    return Path(repo_dir).resolve()


CHECKPOINTS = "checkpoints"
"""The stages' resume checkpoints in a clone (``weakclip_core.training.checkpoint.CHECKPOINT_ROOT``), and its
``.locks`` folder of per-stage run locks, which stays."""


def clear_checkpoints(root: Path) -> list[str]:
    """Delete the training checkpoints in worker clone ``root``; returns the stage folders removed.

    An attempt given up for lost (its retry finished on another worker) leaves a checkpoint behind. A later chain
    at another commit would find it: resumed, its lock entry would name code that made only the last steps; and
    since checkpoints record their code, a stage whose code changed now stops on it instead
    (``CheckpointCodeError``), which no one at the worker would see to. A worker clone is the pool's, never
    anybody's work in progress, so moving it to another commit starts every training afresh."""
    folder = root / CHECKPOINTS
    removed = sorted(entry.name for entry in folder.iterdir() if entry.name != ".locks") if folder.is_dir() else []
    for name in removed:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    return removed


def project_clone(repo_dir: str) -> Path:
    """The clone a coordinating flow (``chain``, ``sweep``) works in: ``repo_dir``, where ``"."`` means
    ``$WEAKCLIP_PROJECT`` (else the working folder). A flow run from a deployment must have it: its working
    folder is the code checkout prefect.yaml's pull step went to (``$WEAKCLIP_REPO``), and a chain there would set
    params and commit its lock in the code checkout, a sweep run the code checkout's HEAD."""
    from prefect.runtime import deployment

    if str(repo_dir) in ("", ".") and not os.environ.get("WEAKCLIP_PROJECT") and deployment.id is not None:
        raise Refused(f"WEAKCLIP_PROJECT is not set for this worker: set it to the project clone this deployment's "
                      f"flow works in (not {Path('.').resolve()}, the code checkout its pull step went to)")
    return worker_clone(repo_dir)


def bring_clone_to(root: Path, state: RunState, logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Check out the coordinator's commit and write its params files and dvc.lock, or refuse in one line; moving
    to another commit clears the clone's training checkpoints (``clear_checkpoints``)."""
    if not (root / ".git").exists():
        raise Refused(f"{socket.gethostname()}:{root} is not a git clone: give the worker its own clone of the project (WEAKCLIP_PROJECT)")
    if state.coordinator and state.coordinator == coordinator_id(root):
        raise Refused(f"{socket.gethostname()}:{root} is the coordinator's own clone: give each worker its own clone (WEAKCLIP_PROJECT)")
    graph = read_stage_graph(root)
    dirty = dirty_paths(root, graph, set(state.params)) + untracked_in_deps(root, graph)
    if dirty:
        raise Refused(
            f"worker clone {socket.gethostname()}:{root} has uncommitted changes in {shown_paths(dirty)}: "
            f"commit or discard them there (git -C {root} status)"
        )
    head = git(["rev-parse", "HEAD"], root).strip()
    if head != state.commit:
        known = subprocess.run(
            ["git", "cat-file", "-e", f"{state.commit}^{{commit}}"], cwd=root, capture_output=True, check=False
        ).returncode == 0
        if not known:
            logger.info("commit %s not in %s: git fetch", state.commit[:12], root)
            try:
                git(["fetch", "--quiet", "origin"], root, timeout=300)
            except (CommandFailed, subprocess.TimeoutExpired) as error:
                # Not a refusal: a network blip or a busy server passes, and the chain's retry may find it.
                raise RuntimeError(
                    f"commit {state.commit[:12]} of the coordinator is not in worker clone {socket.gethostname()}:{root} "
                    f"and git fetch origin failed there: {error}"
                ) from error
            known = subprocess.run(
                ["git", "cat-file", "-e", f"{state.commit}^{{commit}}"], cwd=root, capture_output=True, check=False
            ).returncode == 0
        if not known:
            raise Refused(
                f"commit {state.commit[:12]} of the coordinator is unknown in worker clone {socket.gethostname()}:{root} (also after git fetch "
                "origin): push it from the coordinator (git push) to the repository the workers fetch from"
            )
        git(["checkout", "--quiet", "--force", "--detach", state.commit], root)
        logger.info("%s now at commit %s", root, state.commit[:12])
        cleared = clear_checkpoints(root)
        if cleared:
            logger.info("checkpoints of %s cleared: they were made by commit %s's code", ", ".join(cleared), head[:12])
    # Atomically, as the coordinator's own files are: a worker killed mid-write leaves no half params file or lock
    # for the stage DVC starts next in this clone.
    for relative, text in state.params.items():
        write_text(root / relative, text)
    lock_path = root / "dvc.lock"
    if state.lock is None:
        lock_path.unlink(missing_ok=True)
    else:
        write_text(lock_path, state.lock)


def _overlap(dep: str, out: str) -> str | None:
    """What to fetch of ``out`` for ``dep``: ``dep`` where it lies inside ``out`` (a file of a tracked folder),
    ``out`` where it lies inside ``dep`` (a folder dep holding it), ``None`` where the two are apart."""
    if _under(dep, {out}):
        return dep
    if _under(out, {dep}):
        return out
    return None


def tracked_targets(stage: StageSpec, graph: StageGraph) -> list[str]:
    """The deps of ``stage`` that ``.dvc`` files track (paths, as ``dvc pull`` takes them): a worker's fresh clone
    holds only the ``.dvc`` file."""
    overlaps = (_overlap(dep, tracked) for dep in stage.deps for tracked in graph.tracked_data)
    return sorted({target for target in overlaps if target is not None})


def stale_tracked_copies(root: Path, stage: StageSpec, graph: StageGraph) -> list[str]:
    """The data tracked by ``.dvc`` files that ``stage`` reads and this clone holds in another version than the
    ``.dvc`` file at its commit names (hashed as DVC hashes it; DVC keeps the hashes of unchanged files, so a
    big dataset is read once): an earlier chain's copy after the user changed the data, ``dvc add``ed and
    pushed it. ``dvc status`` cannot tell: it says "not in cache" both of a copy that matches but was never added
    here and of a stale one whose new version this cache lacks."""
    from dvc.repo import Repo

    wanted = {tracked for tracked in graph.tracked_data
              if any(_overlap(dep, tracked) is not None for dep in stage.deps)}
    if not wanted:  # most stages read no hand-tracked data: no index to open
        return []
    stale: list[str] = []
    with Repo(str(root)) as repo:
        for dvc_stage in repo.index.stages:
            if getattr(dvc_stage, "cmd", None):
                continue
            for out in dvc_stage.outs:
                relative = Path(os.path.relpath(out.fs_path, root)).as_posix()
                if relative in wanted and out.exists and out.get_hash() != out.hash_info:
                    stale.append(relative)
    return sorted(stale)


def pull_targets(stage: StageSpec, graph: StageGraph) -> list[str]:
    """The cached deps of ``stage`` that upstream stages made (paths, as ``dvc pull`` takes them)."""
    by_name = graph.by_name()
    cached_outs = [out for parent in stage.upstream for out in by_name[parent].outs
                   if out not in by_name[parent].uncached]
    overlaps = (_overlap(dep, out) for dep in stage.deps for out in cached_outs)
    return sorted({target for target in overlaps if target is not None})


OUTPUT_STALE_STATES = frozenset({"deleted", "not in cache", "modified"})
"""What ``dvc status`` says of an output that the lock names but this clone does not hold: absent, or another
version (an earlier run's in this clone: one given up for lost whose retry finished elsewhere, one with other
``-S`` params). A worker clone's outputs are never anybody's work in progress, so the lock's version replaces it."""


def outputs_only_stale(root: Path, stage_name: str, sent_lock: dict[str, Any]) -> bool:
    """Whether ``stage_name`` matches its entry in the coordinator's lock in everything (deps, params, command)
    but outputs this clone lacks or holds in another version: then pulling the lock's makes it up to date.
    ``False`` for a stage the lock has no entry for, one that is already up to date, or any other change."""
    if stage_name not in (sent_lock.get("stages") or {}):
        return False
    status = json.loads(capture_command(dvc_command("status", "--json", stage_name), root).strip() or "{}")
    changes = status.get(stage_name) or []
    return bool(changes) and all(
        isinstance(change, dict) and set(change) == {"changed outs"}
        and set(change["changed outs"].values()) <= OUTPUT_STALE_STATES
        for change in changes
    )


def remote_description(root: Path, remote: str | None) -> str:
    """``DVC remote 'name' (url)`` for an error message, without the URL's password."""
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            name = remote or repo.config["core"].get("remote")
            url = repo.config["remote"].get(name, {}).get("url", "?") if name else "?"
    except Exception:  # noqa: BLE001 - a description only
        name, url = remote, "?"
    return f"DVC remote {name!r} ({mask_url_passwords(url)})"


def _remote_command(args: list[str], root: Path, remote: str | None, logger: logging.Logger | logging.LoggerAdapter,
                    abandon: threading.Event | None = None) -> None:
    try:
        run_command(dvc_command(*args), root, logger, abandon=abandon)
    except CommandFailed as error:
        if abandon is not None and abandon.is_set():
            raise  # stopped by this worker, not a remote's failure
        tail = " | ".join(line for line in str(error).splitlines()[1:] if line.strip())[-600:]  # masked already
        raise RemoteFailed(f"`dvc {args[0]}` against {remote_description(root, remote)} failed: {tail}") from error


def run_stage_on_worker(
    stage_name: str,
    state: RunState,
    root: Path,
    remote: str | None,
    logger: logging.Logger | logging.LoggerAdapter,
    clone_wait_s: float = 6 * 3600,
    abandon: threading.Event | None = None,
) -> dict[str, Any]:
    """One stage on this worker's clone, against the coordinator's ``state``; see the module's docstring.

    Returns ``{"entry": <its dvc.lock entry>, "files": {cache: false output → base64}, "metrics": {...}}``.
    One stage at a time per clone (a file lock), since a stage owns the clone's checkout and dvc.lock.
    ``abandon`` set (the chain gave this run up): the DVC command it is running is stopped (``CommandFailed``).
    """
    from flows.stage_run import read_stage_metrics

    with held_file_lock(root / CLONE_LOCK, f"worker clone {socket.gethostname()}:{root} is busy with another stage", wait_s=clone_wait_s):
        bring_clone_to(root, state, logger)
        graph = read_stage_graph(root)
        spec = graph.by_name().get(stage_name)
        if spec is None:
            raise KeyError(f"{root / 'dvc.yaml'} at {state.commit[:12]}: no stage named {stage_name!r}")
        if ":" in stage_name:
            raise Refused(f"stage {stage_name!r} is in another dvc.yaml; the pools run stages of the root dvc.yaml only")
        write_files(root, state.files, replaced=[carried for carried in carried_roots(spec, graph)
                                                 if any(_under(path, {carried}) for path in state.files)])
        remote_option = ["--remote", remote] if remote else []
        made = pull_targets(spec, graph)
        if made:
            # --force: a stale copy left by an earlier run in this clone is replaced by the lock's version.
            _remote_command(["pull", "--force", *remote_option, *made], root, remote, logger, abandon)
        # Data tracked by hand is pulled only where this clone lacks it, or holds another version than the commit's
        # .dvc file names: it may have been copied to every machine and `dvc add`ed, never pushed, and `dvc pull
        # --force` of data the remote lacks deletes the copy. A copy of the right version is used as it is.
        absent = [target for target in tracked_targets(spec, graph) if not (root / target).exists()]
        if absent:
            _remote_command(["pull", "--force", *remote_option, *absent], root, remote, logger, abandon)
        stale = stale_tracked_copies(root, spec, graph)
        if stale:
            logger.info("%s: this clone's copy is not the version its .dvc file names at %s: fetching that version",
                        ", ".join(stale), state.commit[:12])
            # Fetch, then check out only what arrived: `dvc fetch` exits 0 without objects the remote lacks, and
            # `dvc checkout --force` of a version not in the cache deletes the copy.
            _remote_command(["fetch", *remote_option, *stale], root, remote, logger, abandon)
            status = json.loads(capture_command(dvc_command("status", "--json", *stale), root).strip() or "{}")
            unfetched = sorted(path for changes in status.values() for change in changes if isinstance(change, dict)
                               for path, what in (change.get("changed outs") or {}).items() if what == "not in cache")
            if unfetched:
                raise RemoteFailed(f"worker clone {socket.gethostname()}:{root} holds another version of "
                                   f"{', '.join(unfetched)} than the .dvc file(s) name at commit {state.commit[:12]}, "
                                   f"and {remote_description(root, remote)} lacks that version: push it from the "
                                   f"coordinator (dvc push); this clone's copy is left as it was")
            run_command(dvc_command("checkout", "--force", *stale), root, logger, abandon=abandon)
        if outputs_only_stale(root, stage_name, read_lock(state.lock)):
            # Up to date in the coordinator's lock, only not in this clone (a fresh clone, another GPU's clone, an
            # earlier run's version here):
            # its outputs come from the remote and dvc repro skips it, as `dvc repro --pull` would, instead of
            # spending hours re-making what the lock already names (and, off bit-exact hardware, new hashes that
            # make every stage after it stale).
            try:
                _remote_command(["pull", "--force", *remote_option, stage_name], root, remote, logger, abandon)
            except RemoteFailed as error:
                logger.warning("%s is up to date in the coordinator's dvc.lock but its outputs could not be pulled "
                               "(%s): it runs", stage_name, error)
        run_command(dvc_command("repro", "--single-item", stage_name), root, logger, abandon=abandon)
        lock = read_lock((root / "dvc.lock").read_text())
        entry = lock.get("stages", {}).get(stage_name)
        if not entry:
            raise RuntimeError(f"{root / 'dvc.lock'} has no entry for {stage_name!r} after dvc repro")
        check_inputs_match(spec, read_lock(state.lock), entry)
        metrics = read_stage_metrics(spec, root)  # before the push: an unreadable file names itself, nothing sent
        if any(out not in spec.uncached for out in spec.outs):
            _remote_command(["push", *(["--remote", remote] if remote else []), stage_name], root, remote, logger,
                            abandon)
        files: dict[str, str] = {}
        for out in spec.uncached:
            files.update(_read_tree(root, out))
        return {"entry": entry, "files": files, "metrics": metrics}

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
3. writes the carried ``cache: false`` deps and ``dvc pull``s exactly the cached
   deps of the stage, by the hashes of the received lock;
4. ``dvc repro --single-item <stage>``, then checks that every dep made by an
   upstream stage has the hash the received lock names (else it fails: the
   stage ran on inputs the coordinator did not choose);
5. ``dvc push``es the stage's cached outputs and returns its ``dvc.lock``
   entry, the bytes of its ``cache: false`` outputs and its metrics.

The coordinator merges each entry into its ``dvc.lock`` (:func:`merge_lock_entry`)
and writes the returned files into its workspace; the next stages get the merged
lock. At the end it ``dvc pull``s and checks ``dvc status``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flows.dag import StageGraph, StageSpec, read_stage_graph
from flows.dvc_cli import CommandFailed, dvc_command, run_command, tool_environment

CHAIN_LOCK = Path(".dvc") / "tmp" / "weakclip-chain.lock"
CLONE_LOCK = Path(".dvc") / "tmp" / "weakclip-stage.lock"
MAX_CARRIED_BYTES = 20 * 1024 * 1024


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


def dirty_paths(root: Path, graph: StageGraph, extra_allowed: set[str]) -> list[str]:
    """Tracked files changed since HEAD that are not ``dvc.lock``, ``extra_allowed``, a stage output or a ``.gitignore``."""
    allowed = {"dvc.lock", *extra_allowed}
    outputs = {out for stage in graph.stages for out in stage.outs}
    changed = []
    for line in git(["status", "--porcelain", "--untracked-files=no"], root).splitlines():
        path = line[3:].split(" -> ")[-1].strip().strip('"')
        # .gitignore files: DVC itself adds its outputs to them when a stage first runs.
        if path and path not in allowed and not _under(path, outputs) and Path(path).name != ".gitignore":
            changed.append(path)
    return sorted(changed)


def params_files(graph: StageGraph) -> list[str]:
    return sorted({path for stage in graph.stages for path in stage.params_files} or {"params.yaml"})


def _read_tree(root: Path, relative: str) -> dict[str, str]:
    """``{path: base64}`` for a file, or for every file under a folder."""
    path = root / relative
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    return {p.relative_to(root).as_posix(): base64.b64encode(p.read_bytes()).decode("ascii") for p in files}


def carried_inputs(stage: StageSpec, graph: StageGraph, root: Path) -> dict[str, str]:
    """The ``cache: false`` outputs of upstream stages that ``stage`` depends on, read from ``root``."""
    by_name = graph.by_name()
    wanted = {out for parent in stage.upstream for out in by_name[parent].uncached}
    files: dict[str, str] = {}
    for dep in stage.deps:
        for out in wanted:
            if _under(dep, {out}) or _under(out, {dep}):
                files.update(_read_tree(root, out if _under(dep, {out}) else dep))
    size = sum(len(value) for value in files.values())
    if size > MAX_CARRIED_BYTES:
        raise Refused(
            f"stage {stage.name!r} depends on {size} bytes of cache: false outputs ({sorted(files)[:5]}...): "
            "more than a run can carry; make those outputs cached (drop cache: false) so they travel through the DVC remote"
        )
    return files


def write_files(root: Path, files: dict[str, str]) -> None:
    for relative, data in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".carried.tmp")
        tmp.write_bytes(base64.b64decode(data))
        os.replace(tmp, path)


def apply_param_overrides(root: Path, overrides: list[str]) -> None:
    """``dvc exp run -S``'s ``[file:]key.path=value`` on the coordinator's params files (comments kept).

    The edited files are then uncommitted params: they travel with every stage run.
    """
    from dvc.utils.serialize import modify_yaml

    for override in overrides:
        target, sep, raw = override.partition("=")
        if not sep or not target:
            raise Refused(f"override {override!r}: expected [file:]key.path=value, e.g. seg.model=deeplabv3plus")
        file_name, colon, dotted = target.rpartition(":")
        path = root / (file_name if colon else "params.yaml")
        with modify_yaml(str(path)) as data:
            node = data
            *parents, leaf = dotted.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = yaml.safe_load(raw)


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
    if dirty or untracked:
        listed = " ".join(dirty + untracked)
        raise Refused(
            f"{root}: uncommitted changes in {listed}: the workers run committed code; commit them first "
            f"(git add {listed} && git commit) and push the commit where the workers fetch from"
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
    data = yaml.safe_load(text) if text else None
    return data if isinstance(data, dict) else {"schema": "2.0", "stages": {}}


def merge_lock_entry(root: Path, stage_name: str, entry: dict[str, Any], guard: threading.Lock) -> str:
    """Put one stage's entry into ``root/dvc.lock`` (atomically); returns the new lock text."""
    with guard:
        path = root / "dvc.lock"
        lock = read_lock(path.read_text() if path.is_file() else None)
        lock.setdefault("schema", "2.0")
        lock.setdefault("stages", {})[stage_name] = entry
        text = yaml.safe_dump(lock, sort_keys=False, width=10_000)
        tmp = path.with_name("dvc.lock.merge.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        return text


def _out_hashes(lock: dict[str, Any], stages: tuple[str, ...]) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in stages:
        for out in (lock.get("stages", {}).get(name) or {}).get("outs", []) or []:
            if "md5" in out:
                found[out["path"]] = out["md5"]
    return found


def check_inputs_match(stage: StageSpec, sent_lock: dict[str, Any], entry: dict[str, Any]) -> None:
    """Every dep made by an upstream stage must have the hash the coordinator's lock names for that output."""
    expected = _out_hashes(sent_lock, stage.upstream)
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


def bring_clone_to(root: Path, state: RunState, logger: logging.Logger | logging.LoggerAdapter) -> None:
    """Check out the coordinator's commit and write its params files and dvc.lock, or refuse in one line."""
    if not (root / ".git").exists():
        raise Refused(f"{root} is not a git clone: give the worker its own clone of the project (WEAKCLIP_PROJECT)")
    if state.coordinator and state.coordinator == coordinator_id(root):
        raise Refused(f"{root} is the coordinator's own clone: give each worker its own clone (WEAKCLIP_PROJECT)")
    graph = read_stage_graph(root)
    dirty = dirty_paths(root, graph, set(state.params))
    if dirty:
        raise Refused(
            f"worker clone {root} has uncommitted changes in {' '.join(dirty)}: "
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
                logger.warning("git fetch failed: %s", error)
            known = subprocess.run(
                ["git", "cat-file", "-e", f"{state.commit}^{{commit}}"], cwd=root, capture_output=True, check=False
            ).returncode == 0
        if not known:
            raise Refused(
                f"commit {state.commit[:12]} of the coordinator is unknown in worker clone {root} (also after git fetch "
                "origin): push it from the coordinator (git push) to the repository the workers fetch from"
            )
        git(["checkout", "--quiet", "--force", "--detach", state.commit], root)
        logger.info("%s now at commit %s", root, state.commit[:12])
    for relative, text in state.params.items():
        (root / relative).write_text(text)
    lock_path = root / "dvc.lock"
    if state.lock is None:
        lock_path.unlink(missing_ok=True)
    else:
        lock_path.write_text(state.lock)


def pull_targets(stage: StageSpec, graph: StageGraph) -> list[str]:
    """The cached deps of ``stage`` that upstream stages made (paths, as ``dvc pull`` takes them)."""
    by_name = graph.by_name()
    targets: list[str] = []
    for dep in stage.deps:
        for parent in stage.upstream:
            spec = by_name[parent]
            for out in spec.outs:
                if out in spec.uncached:
                    continue
                if _under(dep, {out}):
                    targets.append(dep)
                elif _under(out, {dep}):
                    targets.append(out)
    return sorted(set(targets))


def remote_description(root: Path, remote: str | None) -> str:
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            name = remote or repo.config["core"].get("remote")
            url = repo.config["remote"].get(name, {}).get("url", "?") if name else "?"
    except Exception:  # noqa: BLE001 - a description only
        name, url = remote, "?"
    return f"DVC remote {name!r} ({url})"


def _remote_command(args: list[str], root: Path, remote: str | None, logger: logging.Logger | logging.LoggerAdapter) -> None:
    try:
        run_command(dvc_command(*args), root, logger)
    except CommandFailed as error:
        tail = " | ".join(line for line in str(error).splitlines()[1:] if line.strip())[-600:]
        raise RemoteFailed(f"`dvc {args[0]}` against {remote_description(root, remote)} failed: {tail}") from error


def run_stage_on_worker(
    stage_name: str,
    state: RunState,
    root: Path,
    remote: str | None,
    logger: logging.Logger | logging.LoggerAdapter,
    clone_wait_s: float = 6 * 3600,
) -> dict[str, Any]:
    """One stage on this worker's clone, against the coordinator's ``state``; see the module's docstring.

    Returns ``{"entry": <its dvc.lock entry>, "files": {cache: false output → base64}, "metrics": {...}}``.
    One stage at a time per clone (a file lock), since a stage owns the clone's checkout and dvc.lock.
    """
    from flows.stage_run import flatten_metrics

    with held_file_lock(root / CLONE_LOCK, f"worker clone {root} is busy with another stage", wait_s=clone_wait_s):
        bring_clone_to(root, state, logger)
        graph = read_stage_graph(root)
        spec = graph.by_name().get(stage_name)
        if spec is None:
            raise KeyError(f"{root / 'dvc.yaml'} at {state.commit[:12]}: no stage named {stage_name!r}")
        if ":" in stage_name:
            raise Refused(f"stage {stage_name!r} is in another dvc.yaml; the pools run stages of the root dvc.yaml only")
        write_files(root, state.files)
        targets = pull_targets(spec, graph)
        if targets:
            # --force: a stale copy left by an earlier run in this clone is replaced by the lock's version.
            _remote_command(["pull", "--force", *(["--remote", remote] if remote else []), *targets], root, remote, logger)
        run_command(dvc_command("repro", "--single-item", stage_name), root, logger)
        lock = read_lock((root / "dvc.lock").read_text())
        entry = lock.get("stages", {}).get(stage_name)
        if not entry:
            raise RuntimeError(f"{root / 'dvc.lock'} has no entry for {stage_name!r} after dvc repro")
        check_inputs_match(spec, read_lock(state.lock), entry)
        if any(out not in spec.uncached for out in spec.outs):
            _remote_command(["push", *(["--remote", remote] if remote else []), stage_name], root, remote, logger)
        files: dict[str, str] = {}
        for out in spec.uncached:
            files.update(_read_tree(root, out))
        metrics: dict[str, dict[str, float]] = {}
        for relative in spec.metrics:
            path = root / relative
            if path.suffix == ".json" and path.is_file():
                metrics[relative] = flatten_metrics(json.loads(path.read_text()))
        return {"entry": entry, "files": files, "metrics": metrics}

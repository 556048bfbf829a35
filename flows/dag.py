"""The stage graph, read from DVC itself so the DAG is written once (in ``dvc.yaml``).

DVC's own index (``dvc.repo.Repo(root).index.graph``) is a networkx graph whose
edges point from a stage to the stages it depends on; here they are turned
around (upstream → downstream, the direction ``dvc dag --dot`` prints) and kept
as plain, frozen dataclasses so a Prefect flow can pass them between tasks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StageSpec:
    """One DVC stage as the flows need it.

    ``name`` is DVC's address for the stage (``seg_train@gt``; ``sub/dvc.yaml:x``
    outside the root ``dvc.yaml``): exactly what ``dvc repro --single-item`` takes.
    Paths are relative to the repository root.
    """

    name: str
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    metrics: tuple[str, ...]
    upstream: tuple[str, ...]
    # Outputs with ``cache: false`` (metrics, plots, dvclive): DVC never pushes or pulls them.
    uncached: tuple[str, ...] = ()
    # The params files the stage reads (``params.yaml`` unless dvc.yaml names others).
    params_files: tuple[str, ...] = ()
    # The params keys it declares (``weakclip.train``); ``""`` where it declares a whole params file.
    params: tuple[str, ...] = ()


@dataclass(frozen=True)
class StageGraph:
    """The pipeline's stages in a topological order (upstream stages first)."""

    stages: tuple[StageSpec, ...]
    tracked_data: tuple[str, ...] = ()  # the cached outputs of ``.dvc`` files (data tracked by hand, ``dvc add``)

    def by_name(self) -> dict[str, StageSpec]:
        return {stage.name: stage for stage in self.stages}

    def names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def edges(self) -> set[tuple[str, str]]:
        """``(upstream, downstream)`` pairs, the direction of ``dvc dag --dot``."""
        return {(parent, stage.name) for stage in self.stages for parent in stage.upstream}

    def descendants(self, name: str) -> set[str]:
        """Every stage that (transitively) depends on ``name``."""
        children: dict[str, list[str]] = {stage.name: [] for stage in self.stages}
        for parent, child in self.edges():
            children[parent].append(child)
        found: set[str] = set()
        frontier = list(children[name])
        while frontier:
            child = frontier.pop()
            if child not in found:
                found.add(child)
                frontier.extend(children[child])
        return found

    def select(self, targets: list[str]) -> StageGraph:
        """The sub-graph that ``targets`` need: the targets and all their ancestors."""
        by_name = self.by_name()
        unknown = [target for target in targets if target not in by_name]
        if unknown:
            raise KeyError(f"dvc.yaml: no stage named {unknown}; stages are {self.names()}")
        keep: set[str] = set()
        frontier = list(targets)
        while frontier:
            name = frontier.pop()
            if name not in keep:
                keep.add(name)
                frontier.extend(by_name[name].upstream)
        return StageGraph(stages=tuple(stage for stage in self.stages if stage.name in keep),
                          tracked_data=self.tracked_data)


def _repo_relative(path: str, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def stage_address(stage: object, root: Path) -> str:
    """DVC's address of a pipeline stage, relative to the repository root (not to the current folder)."""
    dvcfile = _repo_relative(stage.dvcfile.path, root)  # type: ignore[attr-defined]
    name = stage.name  # type: ignore[attr-defined]
    return name if dvcfile == "dvc.yaml" else f"{dvcfile}:{name}"


def read_stage_graph(repo_dir: Path) -> StageGraph:
    """Read every stage of the DVC project at ``repo_dir`` and the edges between them.

    Stages without a command (``.dvc`` files: data tracked by hand) are sources of
    data, not work; they are left out, and so are the edges from them. Their cached outputs are kept as
    ``tracked_data``: a worker's fresh clone holds only the ``.dvc`` file and pulls the data a stage reads.
    """
    import networkx as nx
    from dvc.repo import Repo

    root = Path(repo_dir).resolve()
    with Repo(str(root)) as repo:
        dvc_graph = repo.index.graph
        # DVC's edges run dependent → dependency; reverse for upstream-first order.
        ordered = list(nx.topological_sort(dvc_graph.reverse(copy=True)))
        specs: list[StageSpec] = []
        tracked: list[str] = []
        for stage in ordered:
            if not getattr(stage, "cmd", None):
                tracked.extend(_repo_relative(out.fs_path, root) for out in stage.outs if out.use_cache)
                continue
            upstream = sorted(stage_address(dep, root) for dep in dvc_graph.successors(stage) if getattr(dep, "cmd", None))
            specs.append(
                StageSpec(
                    name=stage_address(stage, root),
                    cmd=stage.cmd if isinstance(stage.cmd, str) else " && ".join(stage.cmd),
                    deps=tuple(_repo_relative(dep.fs_path, root) for dep in stage.deps),
                    outs=tuple(_repo_relative(out.fs_path, root) for out in stage.outs),
                    metrics=tuple(_repo_relative(out.fs_path, root) for out in stage.outs if out.metric),
                    upstream=tuple(upstream),
                    uncached=tuple(_repo_relative(out.fs_path, root) for out in stage.outs if not out.use_cache),
                    params_files=tuple(
                        sorted({_repo_relative(dep.fs_path, root) for dep in stage.deps if type(dep).__name__ == "ParamsDependency"})
                    ),
                    params=tuple(sorted({key for dep in stage.deps if type(dep).__name__ == "ParamsDependency"
                                         for key in (dep.params or [""])})),
                )
            )
    return StageGraph(stages=tuple(specs), tracked_data=tuple(sorted(tracked)))

"""Test-wide environment: offline hubs, no analytics, a project-local Prefect home, few threads; and how the
suite splits over pytest-xdist workers (``make test`` runs three)."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parent.parent / ".prefect"))

import torch  # noqa: E402

# Under xdist the cores are shared by the workers: each worker's torch takes its share, not all of them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))

# Session fixtures that build a trained tiny project once (here and in tests/faults/conftest.py), and the test
# modules that use each: under xdist (make test) such modules form one scheduling group, run by one worker, so
# the project is built once, not once per worker. Every other module is its own group, so its module fixtures are
# built once too. pytest_collection_modifyitems checks that this table names every module that uses a project.
SHARED_PROJECT_MODULES: dict[str, tuple[str, ...]] = {
    "tiny_chain_project": ("tests/test_end_to_end.py", "tests/test_multi_machine_ssh.py"),
    "reference_project": ("tests/faults/test_determinism.py", "tests/faults/test_kills.py"),
    "model_project": ("tests/faults/test_concurrent_runs.py", "tests/faults/test_interrupts.py",
                      "tests/faults/test_planted_code.py"),
}
_GROUP_OF_MODULE = {module: project for project, modules in SHARED_PROJECT_MODULES.items() for module in modules}


@pytest.fixture(scope="session")
def tiny_chain_project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    """(project, its params, the output of its one ``dvc repro``): the repository's dvc.yaml and code on the tiny
    params, run once in one folder. The end-to-end tests check it; the multi-machine tests clone its commit and
    compare their coordinator's lock with its lock. Nobody writes into it (tests that change it work on a copy)."""
    from test_end_to_end import DVC, REPRO_TIMEOUT_S, build_tiny_project, run  # noqa: PLC0415 (its helpers)

    project = tmp_path_factory.mktemp("e2e") / "project"
    params = build_tiny_project(project)
    output = run([*DVC, "repro"], project, timeout=REPRO_TIMEOUT_S)
    return project, params, output


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses a shared session project must be in a module the table above groups with that project's
    other users, or the project would be built on every worker that runs one of them. Every name of
    ``LONG_GROUPS_FIRST`` must be a group: a misspelt one would silently be scheduled in xdist's order."""
    root = Path(__file__).resolve().parent.parent
    for group in LONG_GROUPS_FIRST:
        if group not in SHARED_PROJECT_MODULES and (group in _GROUP_OF_MODULE or not (root / group).is_file()):
            raise pytest.UsageError(f"tests/conftest.py LONG_GROUPS_FIRST names {group!r}: not a shared project's "
                                    "group nor a test module outside one")
    for item in items:
        module = item.nodeid.split("::", 1)[0]
        for project in SHARED_PROJECT_MODULES:
            if project in getattr(item, "fixturenames", ()) and _GROUP_OF_MODULE.get(module) != project:
                raise pytest.UsageError(f"{item.nodeid} uses the session fixture {project!r}: add {module} to "
                                        f"SHARED_PROJECT_MODULES[{project!r}] in tests/conftest.py")


# The longest scheduling groups (measured with --durations=0 under make test, 2026-12-04: about 400, 350, 140, 120,
# 100, 95, 90, 80 s of one worker), sent out first: started last, a long group would run on alone while the other
# workers sit idle. Every other group follows in xdist's own order.
LONG_GROUPS_FIRST: tuple[str, ...] = (
    "tests/test_multi_machine.py",
    "tiny_chain_project",
    "model_project",
    "reference_project",
    "tests/test_your_own_data_chain.py",
    "tests/test_distributed_stages.py",
    "tests/faults/test_output_folders.py",
    "tests/test_flows.py",
    "tests/test_flows_server.py",
)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """``--dist loadscope`` with the groups above: whole modules (or module groups) go to one worker and run in
    a row, the longest groups first. (xdist's own ``loadgroup`` renames node ids, which pytest 9.2 no longer lets
    it do: its groups were silently ignored, and module fixtures were rebuilt whenever another module's test ran in
    between.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return _GROUP_OF_MODULE.get(module, module)

        def _assign_work_unit(self, node: object) -> None:
            for group in reversed(LONG_GROUPS_FIRST):
                if group in self.workqueue:
                    self.workqueue.move_to_end(group, last=False)
            super()._assign_work_unit(node)

    return ModuleGroupScheduling(config, log)

"""Test-wide environment: offline hubs, no analytics, a project-local Prefect home, few threads; and how the
suite splits over pytest-xdist workers (``make test`` runs two)."""

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

# Session fixtures that build a trained tiny project once (tests/faults/conftest.py): every test that uses one
# runs on the same worker, so the project is built once, not once per worker.
_SHARED_PROJECTS = ("reference_project", "model_project")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """xdist groups (``--dist loadgroup``): a test that uses a shared session project goes with that
    project's other users; every other test goes with its module, whose module fixtures are then built once."""
    for item in items:
        shared = [name for name in _SHARED_PROJECTS if name in getattr(item, "fixturenames", ())]
        item.add_marker(pytest.mark.xdist_group(shared[0] if shared else item.nodeid.split("::", 1)[0]))

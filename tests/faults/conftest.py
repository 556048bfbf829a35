"""Fixtures shared by the fault tests: one uninterrupted tiny chain, run once per session.

``model_project`` is the small finished project (data, CAM store, CLIP and model files) the planted-code,
concurrent-run and interrupt tests copy. The reference project runs every long stage (prepare → … → seg_train@pseudo) as real
processes; the kill tests copy it, delete one stage's outputs, kill that stage and
re-run it, and compare with the reference; the determinism test runs a second chain.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_chain import CHAIN, run_chain, write_project  # noqa: E402


@pytest.fixture(scope="session")
def reference_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny project with every stage of ``CHAIN`` run once, uninterrupted, seed 0."""
    project = write_project(tmp_path_factory.mktemp("reference"))
    run_chain(project, tuple(name for name, _, _ in CHAIN))
    return project


@pytest.fixture(scope="session")
def model_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny data, CAM store, CLIP artifact and every model file a stage loads (``build_model_project``), built
    once for the session: the planted-code, concurrent-run and interrupt tests each work on a copy."""
    from test_planted_code import build_model_project  # noqa: PLC0415 (a test module: import when used)

    return build_model_project(tmp_path_factory.mktemp("model_project"))

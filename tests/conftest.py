"""Test-wide environment: offline hubs, no analytics, a project-local Prefect home, few threads."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_HOME", str(Path(__file__).resolve().parent.parent / ".prefect"))

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

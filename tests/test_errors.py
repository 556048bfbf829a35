"""A stage run from the command line answers a bad input with one line naming the key, and exit status 1."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run_stage(stage: str, params: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"pipeline.{stage}", "--params", str(params)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=120)


def test_bad_param_is_one_line_and_exit_1(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("weakclip:\n  prompt_len: eight\n")
    result = _run_stage("weakclip_train", params)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"weakclip_train: error: {params}: weakclip.prompt_len: expected int, got 'eight'")
    assert "Traceback" not in result.stderr


def test_traceback_on_request(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("bogus_section: {}\n")
    result = _run_stage("prepare", params, WEAKCLIP_TRACEBACK="1")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "bogus_section: unknown key" in result.stderr

"""bench.compare: a user's params variant over seeds beside the baseline, as DVC experiments, in a paired table.

References: hand-worked means, sample standard deviations and t-intervals (the t quantile from a printed table),
and a real DVC project whose one stage scores ``0.5 * scale + 0.01 * seed``, so every experiment's figure is
known before it runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import ablations, compare
from bench.compare import Arm, CompareError, Metric, Run

REPO_ROOT = Path(__file__).resolve().parents[1]
T_975_2 = 4.302652729911275
"""Student's t, 97.5 % quantile, 2 degrees of freedom (printed tables: 4.303)."""


def _runs(arm: str, values: dict[int, float], params: dict | None = None) -> dict[str, Run]:
    return {f"{arm}-s{seed}": Run(params=params or {}, metrics={"metrics/weakclip.json": {"miou": value}})
            for seed, value in values.items()}


def test_paired_difference_and_interval_by_hand() -> None:
    """Baseline 0.70 / 0.72 / 0.74, variant 0.73 / 0.74 / 0.78: differences 0.03 / 0.02 / 0.04, mean 0.03, sample
    std 0.01, 95 % interval 0.03 ± 4.3027 · 0.01 / √3 = (0.00516, 0.05484): higher, ahead in 3 of 3. The arms'
    own spreads (std 0.02 and 0.0265) overlap; pairing by seed is what tells them apart."""
    baseline, variant = Arm("cmp-base-weakclip_train", ()), Arm("mine", ("weakclip.prompt_len=4",))
    finished = {**_runs(baseline.name, {1: 0.70, 2: 0.72, 3: 0.74}), **_runs("mine", {1: 0.73, 2: 0.74, 3: 0.78})}
    [table] = compare.comparison(finished, baseline, (variant,), (Metric("metrics/weakclip.json", "miou"),))
    base_row, row = table["rows"]
    assert base_row["mean"] == pytest.approx(0.72) and base_row["std"] == pytest.approx(0.02)
    assert row["mean"] == pytest.approx(0.75) and row["std"] == pytest.approx(math.sqrt(0.0014 / 2))
    versus = row["vs_baseline"]
    half = T_975_2 * 0.01 / math.sqrt(3)
    assert versus["mean"] == pytest.approx(0.03) and versus["std"] == pytest.approx(0.01)
    assert versus["interval"] == pytest.approx((0.03 - half, 0.03 + half))
    assert versus["interval"][0] == pytest.approx(0.005159, abs=1e-6)
    assert (versus["ahead"], versus["verdict"]) == (2 + 1, "higher")
    markdown = compare.render([table], "weakclip.train.seed_offset", "weakclip_train")
    assert "| mine-s{1,2,3} | weakclip.prompt_len=4 | 3 | 75.0 | 2.6 | 73.0 / 74.0 / 78.0 | +3.0 | 0.5 – 5.5 | 3 of 3 | higher |" \
        in markdown


def test_a_difference_inside_the_noise_is_said_to_be_so() -> None:
    """Differences +0.02, −0.01, +0.02: mean 0.01, std 0.01732, interval 0.01 ± 0.0430 holds 0, though the
    variant leads in two pairs of three; only the seeds both arms ran are paired (seed 4 of the baseline is not)."""
    baseline, variant = Arm("cmp-base-chain", ()), Arm("v", ("seg.train.lr=0.01",))
    finished = {**_runs(baseline.name, {1: 0.60, 2: 0.62, 3: 0.61, 4: 0.90}), **_runs("v", {1: 0.62, 2: 0.61, 3: 0.63})}
    [table] = compare.comparison(finished, baseline, (variant,), (Metric("metrics/weakclip.json", "miou"),))
    versus = table["rows"][1]["vs_baseline"]
    assert versus["seeds"] == [1, 2, 3] and versus["mean"] == pytest.approx(0.01)
    assert versus["std"] == pytest.approx(math.sqrt(0.0003))
    half = T_975_2 * math.sqrt(0.0003) / math.sqrt(3)
    assert versus["interval"] == pytest.approx((0.01 - half, 0.01 + half))
    assert (versus["ahead"], versus["verdict"]) == (2, "not told apart from the noise")
    one = compare.paired_difference({1: 0.7}, {1: 0.6})
    assert one is not None and one["interval"] is None and one["verdict"].startswith("one pair")


def test_the_plan_reuses_finished_runs_and_refuses_a_name_run_otherwise() -> None:
    """A finished experiment of the same name, overrides and seed is reused, not queued again; one with another
    value (or another seed), or one listed without results, stops the run naming it."""
    baseline, variant = Arm("cmp-base-weakclip_train", ()), Arm("b1", ("weakclip.loss.boundary_weight=1.0",))
    seed_key = "weakclip.train.seed_offset"
    finished = {
        "cmp-base-weakclip_train-s1": Run({"weakclip": {"train": {"seed_offset": 1}}}, {}),
        "b1-s1": Run({"weakclip": {"train": {"seed_offset": 1}, "loss": {"boundary_weight": 1.0}}}, {}),
    }
    to_run = compare.plan((baseline, variant), (1, 2), seed_key, finished, set(finished))
    assert to_run == [("cmp-base-weakclip_train-s2", ("weakclip.train.seed_offset=2",)),
                      ("b1-s2", ("weakclip.loss.boundary_weight=1.0", "weakclip.train.seed_offset=2"))]
    other = Arm("b1", ("weakclip.loss.boundary_weight=0.3",))
    with pytest.raises(CompareError, match=r"experiment b1-s1 exists with weakclip.loss.boundary_weight=1.0, not 0.3"):
        compare.plan((baseline, other), (1,), seed_key, finished, set(finished))
    with pytest.raises(CompareError, match=r"experiment b1-s2 is listed without results .*dvc exp remove b1-s2"):
        compare.plan((baseline, variant), (1, 2), seed_key, finished, {*finished, "b1-s2"})


def test_override_keys_and_metrics_are_checked_against_the_project() -> None:
    """A typo'd key would make the "variant" the baseline; the seed key is the comparison's; the default metrics
    are the target's JSON metrics files in dvc.yaml, the summary's headline for the whole chain."""
    import yaml

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    compare.check_override_keys(("weakclip.loss.boundary_weight=1.0",), params, "weakclip.train.seed_offset")
    with pytest.raises(CompareError, match=r"-S weakclip.loss.boundary_wieght: no such key in params.yaml"):
        compare.check_override_keys(("weakclip.loss.boundary_wieght=1.0",), params, "runtime.seed")
    with pytest.raises(CompareError, match=r"-S runtime.seed: the seed key is set by the comparison"):
        compare.check_override_keys(("runtime.seed=3",), params, "runtime.seed")
    assert compare.default_metrics(REPO_ROOT, "weakclip_train") == (Metric("metrics/weakclip.json", "miou"),)
    assert compare.default_metrics(REPO_ROOT, "seg_eval@pseudo") == (Metric("metrics/seg_pseudo.json", "miou"),)
    chain = compare.default_metrics(REPO_ROOT, None)
    assert chain[0] == Metric("metrics/summary.json", "cam_miou") and chain[-1].key == "wsss_fsss_ratio"
    with pytest.raises(CompareError, match=r"--target seg_train@pseudo: the stage writes no metrics/\*.json with an mIoU"):
        compare.default_metrics(REPO_ROOT, "seg_train@pseudo")
    assert compare.seed_key_for("weakclip_train") == "weakclip.train.seed_offset"
    assert compare.seed_key_for("seg_eval@gt") == compare.seed_key_for(None) == "runtime.seed"


SCORE_STAGE = """import json, pathlib, yaml
p = yaml.safe_load(open("params.yaml"))
pathlib.Path("metrics").mkdir(exist_ok=True)
json.dump({"miou": round(0.5 * p["scale"] + 0.01 * p["seed"], 6)}, open("metrics/score.json", "w"))
"""


@pytest.mark.slow
def test_a_variant_over_seeds_as_real_dvc_experiments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A DVC project whose stage scores 0.5 · scale + 0.01 · seed: `run` queues the baseline and the variant at
    seeds 1, 2 and the table holds exactly those figures (scale 0.8: 10 points lower in every pair); a second
    variant queues only its own run (the baseline's are reused); `show` reads the overrides back."""
    project = tmp_path / "project"
    project.mkdir()
    env = {"DVC_NO_ANALYTICS": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid", "HOME": str(tmp_path)}
    (project / "params.yaml").write_text("scale: 1.0\nseed: 0\n")
    (project / "score.py").write_text(SCORE_STAGE)
    (project / "dvc.yaml").write_text("stages:\n  score:\n    cmd: python score.py\n    deps: [score.py]\n"
                                      "    params: [scale, seed]\n    metrics:\n      - metrics/score.json:\n"
                                      "          cache: false\n")
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"],
                    [sys.executable, "-m", "dvc", "repro", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "base"]):
        subprocess.run(command, cwd=project, env=env, check=True, capture_output=True)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(ablations, "REPO", project)
    monkeypatch.setattr(compare, "POLL_S", 1.0)
    common = ["--target", "score", "--seed-key", "seed", "--metric", "metrics/score.json:miou"]

    assert compare.main(["run", "lower", "-S", "scale=0.8", "--seeds", "2", "--json", str(tmp_path / "t.json"), *common]) == 0
    output = capsys.readouterr().out
    assert sum(line.startswith("queued ") for line in output.splitlines()) == 4
    assert "| cmp-base-score-s{1,2} | baseline | 2 | 51.5 | 0.7 | 51.0 / 52.0 |" in output
    assert "| lower-s{1,2} | scale=0.8 | 2 | 41.5 | 0.7 | 41.0 / 42.0 | -10.0 | -10.0 – -10.0 | 0 of 2 | lower |" in output
    [table] = json.loads((tmp_path / "t.json").read_text())["tables"]
    assert table["rows"][1]["values"] == {"1": 0.41, "2": 0.42}

    assert compare.main(["run", "higher", "-S", "scale=1.2", "--seeds", "1", *common]) == 0
    output = capsys.readouterr().out
    assert [line.split(":")[0] for line in output.splitlines() if line.startswith("queued ")] == ["queued higher-s1"]
    assert compare.main(["show", "lower", "higher", *common]) == 0
    output = capsys.readouterr().out
    assert "| higher-s{1} | scale=1.2 | 1 | 61.0 | — | 61.0 | +10.0 |  | 1 of 1 | one pair: no interval, run more seeds |" \
        in output
    assert "| lower-s{1,2} | scale=0.8 |" in output
    with pytest.raises(SystemExit) as stopped:
        compare.main(["run", "lower", "-S", "scale=0.7", "--seeds", "1", *common])
    assert stopped.value.code == 2
    assert "experiment lower-s1 exists with scale=0.8, not 0.7" in capsys.readouterr().err

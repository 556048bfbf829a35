"""bench.compare: a user's params variant over seeds beside the baseline, as DVC experiments, in a paired table.

References: hand-worked means, sample standard deviations and t-intervals (the t quantile from a printed table),
and a real DVC project whose one stage scores ``0.5 * scale + 0.01 * seed``, so every experiment's figure is
known before it runs."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import ablations, compare
from bench.ablations import FinishedRun
from bench.compare import Arm, CompareError, Metric

REPO_ROOT = Path(__file__).resolve().parents[1]
T_975_2 = 4.302652729911275
"""Student's t, 97.5 % quantile, 2 degrees of freedom (printed tables: 4.303)."""
T_975_1 = 12.706204736174707
"""The same at 1 degree of freedom (printed tables: 12.706)."""


WEAKCLIP_SEED = "weakclip.train.seed_offset"


def _runs(arm: str, values: dict[int, float], seed_key: str = WEAKCLIP_SEED) -> dict[str, FinishedRun]:
    """Finished runs of ``arm`` at each seed: the seed param set (nested, as DVC stores params) and one metric."""
    def params(seed: int) -> dict:
        node: dict = {}
        root = node
        *parents, leaf = seed_key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = seed
        return root

    return {f"{arm}-s{seed}": FinishedRun(rev=f"{arm}{seed}", params=params(seed),
                                         metrics={"metrics/weakclip.json": {"miou": value}})
            for seed, value in values.items()}


def test_paired_difference_and_interval_by_hand() -> None:
    """Baseline 0.70 / 0.72 / 0.74, variant 0.73 / 0.74 / 0.78: differences 0.03 / 0.02 / 0.04, mean 0.03, sample
    std 0.01, 95 % interval 0.03 ± 4.3027 · 0.01 / √3 = (0.00516, 0.05484): higher, ahead in 3 of 3. The sides'
    own spreads (std 0.02 and 0.0265) overlap; pairing by seed is what tells them apart."""
    baseline, variant = Arm("cmp-base-weakclip_train", ()), Arm("mine", ("weakclip.prompt_len=4",))
    finished = {**_runs(baseline.name, {1: 0.70, 2: 0.72, 3: 0.74}), **_runs("mine", {1: 0.73, 2: 0.74, 3: 0.78})}
    [table] = compare.comparison(finished, baseline, (variant,), (Metric("metrics/weakclip.json", "miou"),),
                                 WEAKCLIP_SEED)
    base_row, row = table["rows"]
    assert base_row["mean"] == pytest.approx(0.72) and base_row["std"] == pytest.approx(0.02)
    assert row["mean"] == pytest.approx(0.75) and row["std"] == pytest.approx(math.sqrt(0.0014 / 2))
    versus = row["vs_baseline"]
    half = T_975_2 * 0.01 / math.sqrt(3)
    assert versus["mean"] == pytest.approx(0.03) and versus["std"] == pytest.approx(0.01)
    assert versus["interval"] == pytest.approx((0.03 - half, 0.03 + half))
    assert versus["interval"][0] == pytest.approx(0.005159, abs=1e-6)
    assert (versus["ahead"], versus["verdict"]) == (3, "higher")
    markdown = compare.render([table], WEAKCLIP_SEED, "weakclip_train")
    assert "| cmp-base-weakclip_train-s{1,2,3} | baseline | 3 | 72.0 | 2.0 | 70.0 / 72.0 / 74.0 |" in markdown
    assert "| mine-s{1,2,3} | weakclip.prompt_len=4 | 3 | 75.0 | 2.6 | 73.0 / 74.0 / 78.0 | +3.0 | 0.5 – 5.5 | 3 of 3 | higher |" \
        in markdown


def test_a_difference_inside_the_noise_is_said_to_be_so() -> None:
    """Differences +0.02, −0.01, +0.02: mean 0.01, std 0.01732, interval 0.01 ± 0.0430 holds 0, though the
    variant leads in two pairs of three; only the seeds both sides ran are paired (seed 4 of the baseline is not),
    and the table says which. A run whose seed param is not its name's is refused."""
    baseline, variant = Arm("cmp-base-chain", ()), Arm("v", ("seg.train.lr=0.01",))
    finished = {**_runs(baseline.name, {1: 0.60, 2: 0.62, 3: 0.61, 4: 0.90}, "runtime.seed"),
                **_runs("v", {1: 0.62, 2: 0.61, 3: 0.63}, "runtime.seed")}
    metric = Metric("metrics/weakclip.json", "miou")
    [table] = compare.comparison(finished, baseline, (variant,), (metric,), "runtime.seed")
    versus = table["rows"][1]["vs_baseline"]
    assert versus["seeds"] == [1, 2, 3] and versus["mean"] == pytest.approx(0.01)
    assert versus["std"] == pytest.approx(math.sqrt(0.0003))
    half = T_975_2 * math.sqrt(0.0003) / math.sqrt(3)
    assert versus["interval"] == pytest.approx((0.01 - half, 0.01 + half))
    assert (versus["ahead"], versus["verdict"]) == (2, "not told apart from the noise")
    assert "| +1.0 | -3.3 – 5.3 | 2 of 3 |" in compare.render([table], "runtime.seed", None)
    one = compare.paired_difference({1: 0.7}, {1: 0.6})
    assert one is not None and one["interval"] is None and one["verdict"].startswith("one pair")
    assert compare.paired_difference({1: 0.7, 2: 0.6}, {1: 0.7, 2: 0.6})["verdict"] == "identical in every pair"
    # Pairs differing by the same amount have (up to float rounding) std 0 and a zero-width interval: not a
    # "higher". 0.8 - 0.7 and 0.7 - 0.6 differ in their last bits, which gave a std of 8e-17 and "higher".
    for variant_values, baseline_values in (({1: 0.75, 2: 0.5}, {1: 0.5, 2: 0.25}),
                                            ({1: 0.8, 2: 0.7}, {1: 0.7, 2: 0.6})):
        same = compare.paired_difference(variant_values, baseline_values)
        assert same is not None and same["std"] < 1e-15
        assert same["verdict"].startswith("the same difference in every pair")
    finished["v-s2"] = _runs("v", {5: 0.61}, "runtime.seed")["v-s5"]  # named s2, ran at seed 5
    with pytest.raises(CompareError, match=r"experiment v-s2 ran with runtime.seed=5, not 2"):
        compare.comparison(finished, baseline, (variant,), (metric,), "runtime.seed")
    # A metric the runs hold but not as a number is not "no run": the row says how many finished runs lack it.
    ran = {**_runs(baseline.name, {1: 0.60, 2: 0.62}, "runtime.seed"), **_runs("v", {1: 0.62, 2: 0.61, 3: 0.63},
                                                                               "runtime.seed")}
    text_metric = {name: FinishedRun(run.rev, run.params, {"metrics/weakclip.json": {"miou": "0.6"}})
                   for name, run in ran.items()}
    [texts] = compare.comparison(text_metric, baseline, (variant,), (metric,), "runtime.seed")
    assert texts["rows"][1]["runs"] == 3 and texts["rows"][1]["values"] == {}
    assert "| v (3 finished run(s), none with a finite number here) |" in compare.render([texts], "runtime.seed", None)
    assert "| v (no run) |" in compare.render_row({**texts["rows"][1], "runs": 0}, 100.0, 1)
    base_row = table["rows"][0]
    assert "(seeds 1,2,3)" not in compare.render_row(base_row, 100.0, 1)
    assert "+1.0 (seeds 1,2,3)" not in compare.render_row(table["rows"][1], 100.0, 1)  # the variant ran 1-3 only
    wider = {"arm": "w", "baseline": False, "overrides": ["a=1"], "values": {1: 0.7, 2: 0.6, 5: 0.9}, "mean": 0.73,
             "std": 0.15, "vs_baseline": compare.paired_difference({1: 0.7, 2: 0.6, 5: 0.9}, {1: 0.6, 2: 0.6})}
    assert "| +5.0 (seeds 1,2) |" in compare.render_row(wider, 100.0, 1)


def test_overrides_are_read_as_dvc_reads_them() -> None:
    """Hydra's grammar, as `dvc exp run -S`: 1e-3 is a float, yes a string, [1,2] a list, null None; a sweep, an
    added or deleted key and a malformed value are refused before anything is queued."""
    assert compare.parse_overrides(("weakclip.train.lr=1e-3", "a=yes", "b=[1,2]", "c=null", "d='x,y'")) == \
        {"weakclip.train.lr": 0.001, "a": "yes", "b": [1, 2], "c": None, "d": "x,y"}
    assert compare.parse_overrides(("params.yaml:a=1",)) == {"a": 1}  # dvc exp run -S's file prefix
    for text, words in (("a=0.7,0.8", "a sweep"), ("+a=1", "only key=value of an existing key"),
                        ("other.yaml:a=1", "only params.yaml's keys are compared"),
                        ("~a", "only key=value of an existing key"), ("mode=a=b", "not a key=value override")):
        with pytest.raises(CompareError, match=re.escape(f"-S {text}: {words}")):
            compare.parse_overrides((text,))


def test_the_plan_reuses_finished_runs_only_when_every_param_matches() -> None:
    """A finished experiment of the same name is reused only if every param it ran with is params.yaml with the
    arm's overrides and the seed; an extra override, another value or an edited params.yaml stops the run naming
    the key; one listed without results stops it too."""
    baseline, variant = Arm("cmp-base-weakclip_train", ()), Arm("b1", ("weakclip.loss.boundary_weight=1.0",))
    params = {"weakclip": {"train": {"seed_offset": 0, "lr": 0.01}, "loss": {"boundary_weight": 0.0}}}

    def ran(seed: int, weight: float, lr: float = 0.01) -> FinishedRun:
        return FinishedRun(rev="r", params={"weakclip": {"train": {"seed_offset": seed, "lr": lr},
                                                         "loss": {"boundary_weight": weight}}}, metrics={})

    finished = {"cmp-base-weakclip_train-s1": ran(1, 0.0), "b1-s1": ran(1, 1.0)}
    to_run = compare.plan((baseline, variant), (1, 2), WEAKCLIP_SEED, params, finished, set(finished))
    assert to_run == [("cmp-base-weakclip_train-s2", ("weakclip.train.seed_offset=2",)),
                      ("b1-s2", ("weakclip.loss.boundary_weight=1.0", "weakclip.train.seed_offset=2"))]
    other = Arm("b1", ("weakclip.loss.boundary_weight=0.3",))
    with pytest.raises(CompareError, match=r"experiment b1-s1 ran with weakclip.loss.boundary_weight=1.0, not 0.3: "
                                           r"pick another NAME"):
        compare.plan((baseline, other), (1,), WEAKCLIP_SEED, params, finished, set(finished))
    extra = {**finished, "b1-s1": ran(1, 1.0, lr=0.5)}  # ran with one more override than asked for now
    with pytest.raises(CompareError, match=r"experiment b1-s1 ran with weakclip.train.lr=0.5, not 0.01"):
        compare.plan((baseline, variant), (1,), WEAKCLIP_SEED, params, extra, set(extra))
    edited = {"weakclip": {"train": {"seed_offset": 0, "lr": 0.02}, "loss": {"boundary_weight": 0.0}}}
    with pytest.raises(CompareError, match=r"experiment cmp-base-weakclip_train-s1 ran with weakclip.train.lr=0.01, "
                                           r"not 0.02: drop it"):
        compare.plan((baseline, variant), (1,), WEAKCLIP_SEED, edited, finished, set(finished))
    with pytest.raises(CompareError, match=r"experiment\(s\) b1-s2 listed without results .*reused once they "
                                           r"finish.*failed or killed .*`dvc exp remove <name> \.\.\.`"):
        compare.plan((baseline, variant), (1, 2), WEAKCLIP_SEED, params, finished, {*finished, "b1-s2"})
    # An interrupted run leaves several: all in one line (the user removed one per re-run before).
    with pytest.raises(CompareError, match=r"^experiment\(s\) cmp-base-weakclip_train-s3 b1-s2 b1-s3 listed without "
                                           r"results"):
        compare.plan((baseline, variant), (1, 2, 3), WEAKCLIP_SEED, params, finished,
                     {*finished, "b1-s2", "b1-s3", "cmp-base-weakclip_train-s3"})


def _experiment(name: str, state: str | None, metrics: dict, error: dict | None = None) -> dict:
    return {"name": name, "executor": None if state is None else {"state": state, "name": "dvc-task"},
            "revs": [{"rev": name + "rev", "name": name, "error": error,
                      "data": {"params": {"params.yaml": {"data": {"seed": 1}}}, "metrics": metrics}}]}


def test_only_finished_experiments_count() -> None:
    """`dvc exp show --json` (its shape in DVC 3): a queued run has no metrics, a running one still lists the
    committed metrics it has not rewritten, a failed one those of the commit it started from; none counts as
    finished, all are listed. A success, or an experiment whose executor is gone, counts; the workspace entry
    (no experiments) adds nothing."""
    committed = {"metrics/score.json": {"data": {"miou": 0.5}}}
    exp_show = [
        {"rev": "workspace", "name": None, "experiments": None, "data": {"metrics": committed}},
        {"rev": "abc", "name": "main", "experiments": [
            _experiment("done-s1", "success", {"metrics/score.json": {"data": {"miou": 0.61}}}),
            _experiment("old-s1", None, {"metrics/score.json": {"data": {"miou": 0.62}}}),
            _experiment("queued-s1", "queued", {}),
            _experiment("running-s1", "running", committed),
            _experiment("failed-s1", "failed", committed, error={"type": "ReproductionError", "msg": "exit 1"}),
            _experiment("broken-file-s1", "success", {"metrics/score.json": {"error": {"msg": "bad json"}}}),
        ]},
    ]
    finished, listed = ablations.finished_experiments(exp_show)
    assert set(finished) == {"done-s1", "old-s1", "broken-file-s1"}
    assert finished["done-s1"].metrics == {"metrics/score.json": {"miou": 0.61}}
    assert finished["done-s1"].params == {"seed": 1} and finished["broken-file-s1"].metrics == {}
    assert finished["done-s1"].rev == "done-s1rev"
    assert listed == {"done-s1", "old-s1", "queued-s1", "running-s1", "failed-s1", "broken-file-s1"}


def test_keys_metrics_and_names_are_checked_against_the_project() -> None:
    """A typo'd key, a key no stage up to the target reads (the variant would be the baseline), the seed key as an
    override, a seed key that does not exist, a metrics file of a later stage and a name git refuses: each stops the
    comparison naming it. The default metrics are the target's metrics/*.json, the headline for the whole chain."""
    import yaml

    flat = compare.flat_params(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()))
    weakclip_graph = compare.stage_graph(REPO_ROOT, "weakclip_train")
    compare.check_keys({"weakclip.loss.boundary_weight": 1.0, "clip.pretrain.epochs": 2}, flat, WEAKCLIP_SEED,
                       weakclip_graph, "weakclip_train")
    for values, seed_key, words in (
            ({"weakclip.loss.boundary_wieght": 1.0}, WEAKCLIP_SEED, "-S weakclip.loss.boundary_wieght: no such key"),
            ({"seg.train.lr": 0.01}, WEAKCLIP_SEED, "-S seg.train.lr: no stage up to --target weakclip_train reads it"),
            ({"weakclip.train.seed_offset": 3}, WEAKCLIP_SEED, "-S weakclip.train.seed_offset: the seed key is set"),
            ({}, "weakclip.train.sede", "--seed-key weakclip.train.sede: no such key in params.yaml")):
        with pytest.raises(CompareError, match=re.escape(words)):
            compare.check_keys(values, flat, seed_key, weakclip_graph, "weakclip_train")
    assert compare.default_metrics(REPO_ROOT, "weakclip_train") == (Metric("metrics/weakclip.json", "miou"),)
    assert compare.default_metrics(REPO_ROOT, "seg_eval@pseudo") == (Metric("metrics/seg_pseudo.json", "miou"),)
    chain = compare.default_metrics(REPO_ROOT, None)
    assert chain[0] == Metric("metrics/summary.json", "cam_miou") and chain[-1].key == "wsss_fsss_ratio"
    with pytest.raises(CompareError, match=r"--target seg_train@pseudo: the stage writes no metrics/\*.json"):
        compare.default_metrics(REPO_ROOT, "seg_train@pseudo")
    assert compare.parse_metric("metrics/cam.json:miou", weakclip_graph, "weakclip_train") == \
        Metric("metrics/cam.json", "miou")
    with pytest.raises(CompareError, match=r"metrics/pseudo.json is not written by a stage up to --target weakclip"):
        compare.parse_metric("metrics/pseudo.json:miou", weakclip_graph, "weakclip_train")
    # The key must be a number in the committed file, checked before anything is queued (a typo showed only after
    # every run had finished); dotted keys reach nested figures.
    committed_cam = json.loads((REPO_ROOT / "metrics" / "cam.json").read_text())
    assert isinstance(committed_cam["variants"]["patch_cam"]["miou"], float)
    assert compare.parse_metric("metrics/cam.json:variants.patch_cam.miou", weakclip_graph, "weakclip_train",
                                REPO_ROOT) == Metric("metrics/cam.json", "variants.patch_cam.miou")
    with pytest.raises(CompareError, match=r"^--metric metrics/cam.json:mIoU: 'mIoU' is not there in the committed "
                                          r"metrics/cam.json \(numbers at its top level: .*miou"):
        compare.parse_metric("metrics/cam.json:mIoU", weakclip_graph, "weakclip_train", REPO_ROOT)
    with pytest.raises(CompareError, match=r"'variants.patch_cam' is not a number in the committed metrics/cam.json "
                                          r"\(numbers under 'variants': none\)"):
        compare.parse_metric("metrics/cam.json:variants.patch_cam", weakclip_graph, "weakclip_train", REPO_ROOT)
    for name in ("a..b", "x.lock", "cmp-base-mine", "-x", "a b"):
        with pytest.raises(CompareError, match=re.escape(f"NAME {name!r}")):
            compare.check_name(name)
    compare.check_name("boundary-w0.3_v2")
    assert compare.baseline_arm("seg_eval@pseudo", "runtime.seed").name == "cmp-base-seg_eval-pseudo"
    assert compare.baseline_arm("weakclip_train", "runtime.seed").name == "cmp-base-weakclip_train-runtime-seed"
    assert compare.seed_key_for("weakclip_train") == WEAKCLIP_SEED
    assert compare.seed_key_for("seg_eval@gt") == compare.seed_key_for(None) == "runtime.seed"


SCORE_STAGE = """import json, pathlib, yaml
p = yaml.safe_load(open("params.yaml"))
pathlib.Path("metrics").mkdir(exist_ok=True)
json.dump({"miou": round(0.5 * p["scale"] + 0.01 * p["seed"] * p["scale"], 6)}, open("metrics/score.json", "w"))
"""


@pytest.mark.slow
def test_a_variant_over_seeds_as_real_dvc_experiments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A DVC project whose stage scores 0.5 · scale + 0.01 · seed · scale, so every figure is known: `run` queues the
    baseline and the variant at seeds 1, 2 and the table holds exactly 0.51 / 0.52 against 0.408 / 0.416
    (differences −0.102, −0.104: mean −0.103, std 0.001414, 95 % interval −0.103 ± 12.706 · 0.001414 / √2 =
    (−0.1157, −0.0903), t from a printed table); a second variant queues only its own run (the baseline's are
    reused); `show` reads the overrides back; the name reused with another value is refused."""
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
    assert "| cmp-base-score-seed-s{1,2} | baseline | 2 | 51.5 | 0.7 | 51.0 / 52.0 |" in output  # seed key: not the default
    assert "| lower@score-s{1,2} | scale=0.8 | 2 | 41.2 | 0.6 | 40.8 / 41.6 | -10.3 | -11.6 – -9.0 | 0 of 2 | lower |" \
        in output  # the target in the variant's name: a run up to one stage is never reused for another
    [table] = json.loads((tmp_path / "t.json").read_text())["tables"]
    assert table["rows"][1]["values"] == {"1": 0.408, "2": 0.416}
    assert table["rows"][1]["vs_baseline"]["interval"] == pytest.approx(
        [-0.103 - T_975_1 * math.sqrt(2e-6) / math.sqrt(2), -0.103 + T_975_1 * math.sqrt(2e-6) / math.sqrt(2)])

    assert compare.main(["run", "higher", "-S", "scale=1.2", "--seeds", "1", *common]) == 0
    output = capsys.readouterr().out
    assert [line.split(":")[0] for line in output.splitlines() if line.startswith("queued ")] == ["queued higher@score-s1"]
    assert compare.main(["show", "lower", "higher", *common]) == 0
    output = capsys.readouterr().out
    assert "| higher@score-s{1} | scale=1.2 | 1 | 61.2 | — | 61.2 | +10.2 |  | 1 of 1 | one pair: no interval, run more seeds |" \
        in output
    assert "| lower@score-s{1,2} | scale=0.8 |" in output
    with pytest.raises(SystemExit) as stopped:
        compare.main(["run", "lower", "-S", "scale=0.7", "--seeds", "1", *common])
    assert stopped.value.code == 2
    assert "experiment lower@score-s1 ran with scale=0.8, not 0.7: pick another NAME" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the same NAME over the whole chain has no run of its own: nothing reused
        compare.main(["show", "lower", "--seed-key", "seed", "--metric", "metrics/score.json:miou"])
    assert "no finished experiment lower-s<k> on this commit" in capsys.readouterr().err

    # A commit that moves nothing the runs depend on (a README) hides none of them: `run` queues nothing again.
    (project / "README.md").write_text("notes\n")
    for command in (["git", "add", "README.md"], ["git", "commit", "-qm", "docs"]):
        subprocess.run(command, cwd=project, env=env, check=True, capture_output=True)
    assert compare.main(["run", "lower", "-S", "scale=0.8", "--seeds", "2", *common]) == 0
    output = capsys.readouterr().out
    assert "queued " not in output and "also reading the experiments of 1 earlier commit(s)" in output
    assert "| lower@score-s{1,2} | scale=0.8 | 2 | 41.2 | 0.6 | 40.8 / 41.6 | -10.3 |" in output
    # (A change to the stage's code, params or definition leaves them out: the next test, on git alone.)


def _commit(repo: Path, message: str, files: dict[str, str]) -> str:
    for name, text in files.items():
        (repo / name).write_text(text)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, capture_output=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-qm", message],
                   cwd=repo, check=True, capture_output=True)
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_an_earlier_commits_runs_count_only_while_code_stages_and_params_are_heads(tmp_path: Path) -> None:
    """Each commit below is checked against the one after it (then HEAD): a README, a comment in params.yaml and a
    change to a file no stage reads keep the earlier runs; a changed dep of the stage, a changed param value, a
    changed stage definition or `vars` drop them, as each could move a figure."""
    from flows.dag import StageGraph, StageSpec

    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    stage = "stages:\n  score:\n    cmd: python score.py\n    deps: [score.py, lib]\n    params: [scale]\n"
    graph = StageGraph(stages=(StageSpec(name="score", cmd="python score.py", deps=("score.py", "lib", "params.yaml"),
                                         outs=(), metrics=(), upstream=(), params_files=("params.yaml",),
                                         params=("scale",)),))
    (repo / "lib").mkdir()
    previous = _commit(repo, "base", {"params.yaml": "scale: 1.0\n", "dvc.yaml": stage, "score.py": "x = 1\n",
                                      "lib/util.py": "y = 1\n", "other.py": "z = 1\n"})
    steps = [({"README.md": "notes\n"}, True),
             ({"params.yaml": "scale: 1.0  # the default\n"}, True),
             ({"other.py": "z = 2\n"}, True),
             ({"lib/util.py": "y = 2\n"}, False),
             ({"score.py": "x = 2\n"}, False),
             ({"params.yaml": "scale: 2.0\n"}, False),
             ({"dvc.yaml": stage.replace("python score.py", "python -O score.py")}, False),
             ({"dvc.yaml": "vars:\n  - n: 1\n" + stage.replace("python score.py", "python -O score.py")}, False)]
    for files, kept in steps:
        _commit(repo, f"change {', '.join(files)}", files)
        assert compare.same_code_and_params(repo, previous, graph) is kept, files
        previous = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True,
                                  text=True).stdout.strip()


def test_an_interrupt_is_one_line_saying_what_stays_queued(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C while queueing or waiting was a KeyboardInterrupt traceback; the queue keeps what was queued."""
    def interrupted(arguments, repo):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare, "run_comparison", interrupted)
    with pytest.raises(SystemExit) as stopped:
        compare.main(["run", "x", "-S", "scale=0.8"])
    error = capsys.readouterr().err
    assert stopped.value.code == 130 and error.count("\n") == 1 and "Traceback" not in error
    assert error.startswith("compare: interrupted. Experiments already queued stay in DVC's queue")
    assert "`dvc queue start`" in error and "`dvc queue remove --queued`" in error

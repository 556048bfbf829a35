"""``bench.machine_runs``: a run of the committed chain on another machine, checked to be the committed
configuration and compared with the seeds' range and 95 % prediction interval (worked by hand with textbook
Student's t quantiles), then rendered by the summary stage."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from bench.chain_seeds import prediction_interval
from bench.machine_runs import MachineRunError, add_run, comparison_rows, configuration_differences, render

# Three stages as dvc.lock writes them: `train` reads code and an input folder and writes a model that `score`
# reads; `score` writes the summary.
LOCK = {"schema": "2.0", "stages": {
    "train": {"cmd": "python -m train",
              "deps": [{"path": "code/train.py", "hash": "md5", "md5": "c0de"},
                       {"path": "imports/none", "hash": "md5", "md5": "1111.dir"}],
              "params": {"params.yaml": {"train": {"lr": 0.1}}},
              "outs": [{"path": "models/train", "hash": "md5", "md5": "aaaa.dir"}]},
    "score": {"cmd": "python -m score",
              "deps": [{"path": "models/train/model.pt", "hash": "md5", "md5": "bbbb"},
                       {"path": "code/score.py", "hash": "md5", "md5": "5c0e"}],
              "outs": [{"path": "metrics/summary.json", "hash": "md5", "md5": "cccc"}]},
    # Renders the summary with a bench table no stage writes (bench.ablations collect refreshes it later).
    "report": {"cmd": "python -m report",
               "deps": [{"path": "metrics/summary.json", "hash": "md5", "md5": "cccc"},
                        {"path": "metrics/ablations_grid.json", "hash": "md5", "md5": "dddd"},
                        {"path": "code/report.py", "hash": "md5", "md5": "4e90"}],
               "outs": [{"path": "docs/RESULTS.md", "hash": "md5", "md5": "eeee"}]}}}

COMMITTED = {"cam_miou": 0.456, "weakclip_miou": 0.778, "pseudo_miou": 0.930, "seg_pseudo_miou": 0.822,
             "seg_gt_miou": 0.804, "wsss_fsss_ratio": 1.0224}
SEEDS = {"title": "Headline over training seeds", "rows": [
    {"figure": "CAM seeds (MCTformer-V2)", "per seed": "45.6 / 42.0 / 38.1"},
    {"figure": "Segmenter trained on pseudo masks (WSSS)", "per seed": "82.2 / 76.8 / 84.1"},
    {"figure": "WSSS / FSSS ratio", "per seed": "1.023 / 0.942 / 0.978"}]}
OTHER = {"cam_miou": 0.2833, "weakclip_miou": 0.7195, "pseudo_miou": 0.8836, "seg_pseudo_miou": 0.7880,
         "seg_gt_miou": 0.8423, "wsss_fsss_ratio": 0.93558}


def test_only_what_a_run_is_given_must_match() -> None:
    other = copy.deepcopy(LOCK)
    other["stages"]["train"]["outs"][0]["md5"] = "9999.dir"       # its own results: allowed to differ
    other["stages"]["score"]["deps"][0]["md5"] = "8888"           # a file passed along the chain: allowed
    other["stages"]["score"]["outs"][0]["md5"] = "7777"
    other["stages"]["report"]["deps"][1]["md5"] = "6666"          # a bench table refreshed since: a result
    assert configuration_differences(LOCK, other) == []
    other["stages"]["report"]["deps"][2]["md5"] = "0ther"         # the report's code: given
    assert configuration_differences(LOCK, other) == ["stage report: dep code/report.py differs"]
    other["stages"]["report"]["deps"][2]["md5"] = "4e90"
    other["stages"]["train"]["deps"][0]["md5"] = "0ther"          # other code
    other["stages"]["train"]["params"]["params.yaml"]["train"]["lr"] = 0.2
    del other["stages"]["score"]
    assert configuration_differences(LOCK, other) == [
        "stage score: only in the committed dvc.lock", "stage train: params differ",
        "stage train: dep code/train.py differs"]


def test_the_prediction_interval_matches_a_hand_computation_with_textbook_t() -> None:
    # n = 3: mean 41.9, s = sqrt((3.7² + 0.1² + 3.8²) / 2) = 3.7510; t(0.975, 2) = 4.303 (textbook table);
    # half-width 4.303 * 3.7510 * sqrt(1 + 1/3) = 18.64.
    low, high = prediction_interval([45.6, 42.0, 38.1])
    assert low == pytest.approx(41.9 - 18.636, abs=0.01) and high == pytest.approx(41.9 + 18.636, abs=0.01)
    # n = 2: mean 1, s = sqrt(2), t(0.975, 1) = 12.706; half-width 12.706 * 1.41421 * sqrt(1.5) = 22.008.
    assert prediction_interval([0.0, 2.0]) == pytest.approx((1 - 22.008, 1 + 22.008), abs=0.005)
    # A 90 % interval: t(0.95, 2) = 2.920, half-width 2.920 * 3.7510 * 1.1547 = 12.65.
    assert prediction_interval([45.6, 42.0, 38.1], level=0.90)[1] == pytest.approx(41.9 + 12.647, abs=0.01)
    # Cut to the values a figure can take: 94.4 / 88.2 / 94.4 gives 92.33 ± 17.79, above 100 points.
    assert prediction_interval([94.4, 88.2, 94.4], limits=(0.0, 100.0))[1] == 100.0
    assert prediction_interval([94.4, 88.2, 94.4])[1] == pytest.approx(92.333 + 17.785, abs=0.01)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        prediction_interval([41.9])
    one_seed = {"rows": [{"figure": "CAM seeds (MCTformer-V2)", "per seed": "41.9"}]}
    with pytest.raises(MachineRunError, match=r"chain_seeds.json: row 'CAM seeds \(MCTformer-V2\)': .*at least 2"):
        comparison_rows(COMMITTED, one_seed, [{"label": "B", "summary": OTHER}])


def test_each_figure_is_placed_against_the_seeds_range_and_prediction_interval() -> None:
    rows = {row["figure"]: row for row in comparison_rows(COMMITTED, SEEDS, [{"label": "AMD", "summary": OTHER}])}
    cam = rows["CAM seeds (MCTformer-V2)"]
    # 28.3 points: below the seeds' 38.1 - 45.6, inside their interval 23.3 - 60.5 (hand computation above).
    assert cam == {"figure": "CAM seeds (MCTformer-V2)", "split": "train", "committed run": "45.6",
                   "training seeds (3 runs)": "38.1 – 45.6", "95% prediction interval": "23.3 – 60.5",
                   "AMD": "28.3 (inside the prediction interval, below the seeds' range)"}
    # 82.2 / 76.8 / 84.1: mean 81.03, s 3.787, half-width 4.303 * 3.787 * 1.1547 = 18.82 -> 62.2 - 99.8.
    seg = rows["Segmenter trained on pseudo masks (WSSS)"]
    assert seg["95% prediction interval"] == "62.2 – 99.8" and seg["AMD"] == "78.8 (inside the seeds' range)"
    # The ratio, at three decimals: 1.023 / 0.942 / 0.978, mean 0.981, s 0.04058, half-width 0.2016.
    ratio = rows["WSSS / FSSS ratio"]
    assert ratio["95% prediction interval"] == "0.779 – 1.183"
    assert ratio["AMD"] == "0.936 (inside the prediction interval, below the seeds' range)"
    assert ratio["committed run"] == "1.022"
    # A figure the seeds table lacks shows the value without a verdict.
    assert rows["WeakCLIP prediction"]["AMD"] == "72.0" and "training seeds (3 runs)" not in rows["WeakCLIP prediction"]
    # Tight seeds 50.0 / 50.2 / 49.8: s = 0.2, half-width 4.303 * 0.2 * 1.1547 = 0.994 -> 49.0 - 51.0.
    tight = {"rows": [{"figure": "CAM seeds (MCTformer-V2)", "per seed": "50.0 / 50.2 / 49.8"}]}

    def placed(cam_miou: float) -> str:
        return comparison_rows(COMMITTED, tight, [{"label": "B", "summary": dict(OTHER, cam_miou=cam_miou)}])[0]["B"]

    assert placed(0.489) == "48.9 (outside: below the prediction interval)"
    assert placed(0.490) == "49.0 (inside the prediction interval, below the seeds' range)"  # the interval's edge
    assert placed(0.498) == "49.8 (inside the seeds' range)"                                 # the range's edge
    assert placed(0.511) == "51.1 (outside: above the prediction interval)"
    # An interval that would pass 100 points stops there (mIoU), the ratio's only at 0.
    high = {"rows": [{"figure": "Pseudo masks (WeakCLIP + CRF)", "per seed": "94.4 / 88.2 / 94.4"},
                     {"figure": "WSSS / FSSS ratio", "per seed": "0.050 / 0.900 / 0.500"}]}
    cut = {row["figure"]: row for row in comparison_rows(COMMITTED, high, [])}
    assert cut["Pseudo masks (WeakCLIP + CRF)"]["95% prediction interval"] == "74.5 – 100.0"
    assert cut["WSSS / FSSS ratio"]["95% prediction interval"].startswith("0.000 – ")
    # With the unrounded values chain_seeds stores ("values"), those are used, as its own table uses them:
    # 0.9441 / 0.8825 / 0.9444: mean 0.92367, s 0.035652, half-width 4.303 * 0.035652 * 1.1547 = 0.17713 ->
    # 74.65, shown 74.7 (74.5 from the rounded cells above), the top cut at 100.
    stored = dict(high, values={"pseudo_miou": [0.9441, 0.8825, 0.9444]})
    pseudo = next(row for row in comparison_rows(COMMITTED, stored, []) if row["figure"].startswith("Pseudo"))
    assert pseudo["95% prediction interval"] == "74.7 – 100.0" and pseudo["training seeds (3 runs)"] == "88.2 – 94.4"


def write_repo(root: Path, lock: dict, summary: dict) -> Path:
    (root / "metrics").mkdir(parents=True)
    (root / "dvc.lock").write_text(yaml.safe_dump(lock), encoding="utf-8")
    (root / "metrics" / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return root


def test_add_checks_the_configuration_then_writes_a_table_the_summary_renders(tmp_path: Path) -> None:
    from pipeline.summary import ablation_section

    repo = write_repo(tmp_path / "repo", LOCK, COMMITTED)
    (repo / "metrics" / "chain_seeds.json").write_text(json.dumps(SEEDS), encoding="utf-8")
    other_lock = copy.deepcopy(LOCK)
    other_lock["stages"]["train"]["outs"][0]["md5"] = "9999.dir"
    clone = write_repo(tmp_path / "clone", other_lock, OTHER)
    output = add_run(clone, "AMD EPYC", repo=repo)
    # The same label again replaces its run; another label adds a column.
    add_run(clone, "AMD EPYC", repo=repo)
    add_run(clone, "Intel", repo=repo)
    data = json.loads(output.read_text(encoding="utf-8"))
    assert [run["label"] for run in data["runs"]] == ["AMD EPYC", "Intel"]
    assert data["runs"][0]["summary"] == OTHER
    rendered = ablation_section(output)
    placed = "28.3 (inside the prediction interval, below the seeds' range)"
    assert f"| CAM seeds (MCTformer-V2) | train | 45.6 | 38.1 – 45.6 | 23.3 – 60.5 | {placed} | {placed} |" in rendered
    # render re-derives the same table from the stored runs (after a new chain_seeds.json, the new spread).
    before = output.read_text(encoding="utf-8")
    assert render(repo) == output and output.read_text(encoding="utf-8") == before
    (repo / "metrics" / "chain_seeds.json").write_text(json.dumps(
        {"rows": [{"figure": "CAM seeds (MCTformer-V2)", "per seed": "30.0 / 28.0"}]}), encoding="utf-8")
    render(repo)
    assert json.loads(output.read_text(encoding="utf-8"))["rows"][0]["AMD EPYC"] == "28.3 (inside the seeds' range)"

    other_lock["stages"]["score"]["deps"][1]["md5"] = "edited"
    (clone / "dvc.lock").write_text(yaml.safe_dump(other_lock), encoding="utf-8")
    with pytest.raises(MachineRunError, match=r"(?s)clone/dvc.lock: not the committed configuration .*code/score.py"):
        add_run(clone, "edited", repo=repo)
    (clone / "metrics" / "summary.json").unlink()
    (clone / "dvc.lock").write_text(yaml.safe_dump(LOCK), encoding="utf-8")
    with pytest.raises(MachineRunError, match=r"clone/metrics/summary.json: metrics file missing"):
        add_run(clone, "no summary", repo=repo)
    (clone / "metrics" / "summary.json").write_bytes(b"\xff\xfe{}")  # not UTF-8: unreadable, not a crash
    with pytest.raises(MachineRunError, match=r"clone/metrics/summary.json: cannot read"):
        add_run(clone, "garbled summary", repo=repo)


def test_render_without_recorded_runs_names_the_file(tmp_path: Path) -> None:
    repo = write_repo(tmp_path / "repo", LOCK, COMMITTED)
    with pytest.raises(MachineRunError, match=r"repo/metrics/machine_runs.json: no machine runs recorded yet"):
        render(repo)

"""``bench.machine_runs``: a run of the committed chain on another machine, checked to be the committed
configuration and compared with the seeds' range (worked by hand), then rendered by the summary stage."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from bench.machine_runs import MachineRunError, add_run, comparison_rows, configuration_differences

# Two stages as dvc.lock writes them: `train` reads code and an input folder and writes a model that `score`
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
              "outs": [{"path": "metrics/summary.json", "hash": "md5", "md5": "cccc"}]}}}

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
    assert configuration_differences(LOCK, other) == []
    other["stages"]["train"]["deps"][0]["md5"] = "0ther"          # other code
    other["stages"]["train"]["params"]["params.yaml"]["train"]["lr"] = 0.2
    del other["stages"]["score"]
    assert configuration_differences(LOCK, other) == [
        "stage score: only in the committed dvc.lock", "stage train: params differ",
        "stage train: dep code/train.py differs"]


def test_each_figure_is_marked_inside_or_outside_the_seeds_range() -> None:
    rows = {row["figure"]: row for row in comparison_rows(COMMITTED, SEEDS, [{"label": "AMD", "summary": OTHER}])}
    cam = rows["CAM seeds (MCTformer-V2)"]
    # 28.3 points against the seeds' 38.1 - 45.6: below.
    assert cam == {"figure": "CAM seeds (MCTformer-V2)", "split": "train", "committed run": "45.6",
                   "training seeds (3 runs)": "38.1 – 45.6", "AMD": "28.3 (outside: below the seeds' range)"}
    # 78.8 within 76.8 - 84.1; the ratio 0.936 below 0.942 (compared at three decimals).
    assert rows["Segmenter trained on pseudo masks (WSSS)"]["AMD"] == "78.8 (inside)"
    assert rows["WSSS / FSSS ratio"]["AMD"] == "0.936 (outside: below the seeds' range)"
    assert rows["WSSS / FSSS ratio"]["committed run"] == "1.022"
    # A figure the seeds table lacks shows the value without a verdict.
    assert rows["WeakCLIP prediction"]["AMD"] == "72.0" and "training seeds (3 runs)" not in rows["WeakCLIP prediction"]
    # A value on the range's edge is inside.
    edge = dict(OTHER, cam_miou=0.381)
    assert comparison_rows(COMMITTED, SEEDS, [{"label": "B", "summary": edge}])[0]["B"] == "38.1 (inside)"


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
    assert ("| CAM seeds (MCTformer-V2) | train | 45.6 | 38.1 – 45.6 | 28.3 (outside: below the seeds' range) | "
            "28.3 (outside: below the seeds' range) |") in rendered

    other_lock["stages"]["score"]["deps"][1]["md5"] = "edited"
    (clone / "dvc.lock").write_text(yaml.safe_dump(other_lock), encoding="utf-8")
    with pytest.raises(MachineRunError, match=r"(?s)clone/dvc.lock: not the committed configuration .*code/score.py"):
        add_run(clone, "edited", repo=repo)
    (clone / "metrics" / "summary.json").unlink()
    (clone / "dvc.lock").write_text(yaml.safe_dump(LOCK), encoding="utf-8")
    with pytest.raises(MachineRunError, match=r"clone/metrics/summary.json: cannot read"):
        add_run(clone, "no summary", repo=repo)

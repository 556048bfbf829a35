"""The summary stage against hand-made metrics files: exact keys, the ratio, RESULTS.md tables, clear errors."""

import json
from pathlib import Path

import pytest

from pipeline.summary import SummaryError, SummaryPaths, summary_line, write_summary
from weakclip_core.config import params_from_dict

PARAMS = params_from_dict({"dataset": {"name": "synthetic"}})
HAND_MADE = {
    "cam": {"miou": 0.52, "split": "train", "n_images": 800, "threshold_chosen_with_gt": True,
            "variant": "fused_affinity", "best_threshold": 0.31, "per_class": {"background": 0.8, "cat": 0.24},
            "variants": {"class_token": {"miou": 0.40, "best_threshold": 0.2},
                         "fused_affinity": {"miou": 0.52, "best_threshold": 0.31}}},
    "weakclip": {"miou": 0.61, "split": "train", "n_images": 800, "thresholds_chosen_with_gt": False,
                 "per_class": {"background": 0.85, "cat": 0.37}},
    "pseudo": {"miou": 0.64, "miou_before_crf": 0.62, "miou_after_crf": 0.64, "split": "train",
               "n_images": 800, "threshold_chosen_with_gt": False, "per_class": {"background": 0.86, "cat": 0.42}},
    "seg_pseudo": {"miou": 0.57, "split": "val", "n_images": 200, "threshold_chosen_with_gt": False,
                   "model": "deeplabv3plus", "encoder": "resnet18"},
    "seg_gt": {"miou": 0.60, "split": "val", "n_images": 200, "threshold_chosen_with_gt": False},
}


def write_metrics(root: Path, files: dict) -> SummaryPaths:
    (root / "metrics").mkdir(parents=True, exist_ok=True)
    for stem, data in files.items():
        (root / "metrics" / f"{stem}.json").write_text(json.dumps(data))
    return SummaryPaths(metrics_root=root / "metrics", results=root / "docs" / "RESULTS.md")


def test_summary_keys_ratio_and_results_tables(tmp_path):
    paths = write_metrics(tmp_path, HAND_MADE)
    (paths.metrics_root / "ablations_prompt_len.json").write_text(json.dumps({
        "title": "Prompt length", "split": "train", "threshold_chosen_with_gt": False,
        "rows": [{"setting": "prompt_len=4", "miou": 0.605}, {"setting": "prompt_len=8", "miou": 0.61,
                                                             "note": "default"}]}))
    summary = write_summary(PARAMS, paths)
    on_disk = json.loads(paths.summary.read_text())
    assert list(on_disk) == ["cam_miou", "weakclip_miou", "pseudo_miou", "seg_pseudo_miou", "seg_gt_miou",
                             "wsss_fsss_ratio"]
    assert on_disk == summary
    assert on_disk["cam_miou"] == 0.52 and on_disk["pseudo_miou"] == 0.64 and on_disk["seg_gt_miou"] == 0.60
    assert on_disk["wsss_fsss_ratio"] == pytest.approx(0.95)  # 0.57 / 0.60
    results = paths.results.read_text()
    assert "| CAM seeds (MCTformer-V2) | `cam.json` | train | 800 | 52.0 | yes |" in results
    assert "| Pseudo masks (WeakCLIP + CRF) | `pseudo.json` | train | 800 | 64.0 | no |" in results
    assert "before CRF 62.0, after CRF 64.0" in results
    assert "| 0.950 |" in results
    assert "labelled classes with no pixel" not in results  # no repair recorded: none claimed
    assert "## CAM variant ablation" in results and "| class_token | 40.0 | 0.2 | yes |" in results
    assert "### Prompt length (`ablations_prompt_len.json`)" in results
    assert "| prompt_len=4 | 60.5 | — |" in results and "| prompt_len=8 | 61.0 | default |" in results
    assert "| cat | 24.0 | 37.0 | 42.0 |" in results


def test_the_pseudo_row_counts_the_images_its_miou_is_over(tmp_path):
    """VOC: pseudo masks for all 10,582 train_aug images, scored on the 1,464 of `train` that have GT: the row's
    image count is the scored one, with the count made beside it (it used to say 10582 beside a train mIoU)."""
    files = json.loads(json.dumps(HAND_MADE))
    files["pseudo"].update(n_images=10582, n_scored=1464)
    paths = write_metrics(tmp_path, files)
    write_summary(PARAMS, paths)
    assert "| Pseudo masks (WeakCLIP + CRF) | `pseudo.json` | train | 1464 (of 10582 made) | 64.0 | no |" in \
        paths.results.read_text()
    files["pseudo"].update(n_images=800, n_scored=800)
    write_summary(PARAMS, write_metrics(tmp_path, files))
    assert "| `pseudo.json` | train | 800 | 64.0 |" in paths.results.read_text()


@pytest.mark.parametrize(("odds_ratio", "use_crf", "note"), [
    (2.0, True, "before CRF 62.0, after CRF + absent-class repair 64.0; scales ?, flip ?; labelled classes with no "
                "pixel: 203 of 1312 after CRF, 69 after the repair (odds ratio 2.0)"),
    (0.0, True, "before CRF 62.0, after CRF 64.0; scales ?, flip ?; labelled classes with no pixel: 203 of 1312 "
                "after CRF, repair off"),
    (2.0, False, "| Pseudo masks (WeakCLIP, no CRF) | `pseudo.json` | train | 800 | 64.0 | no | no CRF (pseudo.use_crf: "
                 "false): the prediction 62.0, after absent-class repair 64.0; scales ?, flip ?; labelled classes "
                 "with no pixel: 203 of 1312 in the prediction, 69 after the repair (odds ratio 2.0) |"),
])
def test_the_pseudo_row_names_the_absent_class_repair_and_its_counts(tmp_path, odds_ratio, use_crf, note):
    repaired = {**HAND_MADE["pseudo"], "use_crf": use_crf, "absent_class_repair": {
        "odds_ratio": odds_ratio, "labelled_pairs": 1312, "absent_before_repair": 203, "absent_after_repair": 69}}
    paths = write_metrics(tmp_path, {**HAND_MADE, "pseudo": repaired})
    write_summary(PARAMS, paths)
    assert note in paths.results.read_text()


def test_a_chain_whose_weakclip_trained_on_gt_says_so_on_every_row_it_reaches(tmp_path):
    """weakclip.seeds.source: gt (an upper bound) flags weakclip.json; pseudo_masks and seg_eval carry the flag:
    RESULTS.md then names GT on the WeakCLIP, pseudo-mask and segmenter rows, never "seeds confident"."""
    files = {**HAND_MADE,
             "weakclip": {**HAND_MADE["weakclip"], "seed_mode": "confident", "seeds_source": "gt", "gt_used": True},
             "pseudo": {**HAND_MADE["pseudo"], "gt_used_in_training": True},
             "seg_pseudo": {**HAND_MADE["seg_pseudo"], "gt_used_in_training": True}}
    paths = write_metrics(tmp_path, files)
    write_summary(PARAMS, paths)
    results = paths.results.read_text()
    assert "seeds GT masks (an upper bound, not WSSS)" in results and "seeds confident" not in results
    assert "flip ?; trained on GT masks (an upper bound, not WSSS)" in results
    assert "deeplabv3plus / resnet18; trained on GT masks" in results
    # The paragraph under the headline says so too; it used to call this chain WSSS on image-level labels only.
    assert "is an upper bound that uses GT, not a WSSS result." in results
    assert "uses image-level labels only" not in results


def test_a_chain_on_imported_seed_masks_says_so_and_claims_no_cam_threshold(tmp_path):
    """weakclip.seeds.source: mask_folder with cam.source: none: the WeakCLIP row names the imported masks (no
    confident-seed thresholds ran: it said "seeds confident"), and the paragraph claims no CAM threshold."""
    files = {**HAND_MADE,
             "cam": {"miou": None, "not_scored": "not scored: no CAMs (cam.source: none)", "split": "train",
                     "threshold_chosen_with_gt": False},
             "weakclip": {**HAND_MADE["weakclip"], "seed_mode": "confident", "seeds_source": "mask_folder"}}
    paths = write_metrics(tmp_path, files)
    write_summary(PARAMS, paths)
    results = paths.results.read_text()
    assert "seeds imported masks (weakclip.seeds.source: mask_folder)" in results and "seeds confident" not in results
    assert ("The chain (imported seed masks → WeakCLIP → pseudo masks → segmenter) uses the imported masks "
            "(`weakclip.seeds.source: mask_folder`) and the image-level labels") in results
    assert "CAM row's GT-chosen" not in results


def test_ablation_columns_in_percent_are_the_miou_ones_whatever_their_case(tmp_path):
    """A column named mIoU / *_miou holds a fraction shown in percent; a word that merely contains the letters
    ("previous") is shown as it is (it stopped the stage as an out-of-range fraction)."""
    paths = write_metrics(tmp_path, HAND_MADE)
    (paths.metrics_root / "ablations_prompt.json").write_text(json.dumps({
        "title": "Prompts", "rows": [{"setting": "N = 4", "mIoU": 0.612, "previous run (points)": 61.0,
                                      "val_miou, all classes (mean)": 0.5}]}))
    write_summary(PARAMS, paths)
    assert "| N = 4 | 61.2 | 61.0 | 50.0 |" in paths.results.read_text()


@pytest.mark.parametrize("stem", list(HAND_MADE))
def test_a_missing_metrics_file_is_named(tmp_path, stem):
    paths = write_metrics(tmp_path, {k: v for k, v in HAND_MADE.items() if k != stem})
    with pytest.raises(SummaryError, match=rf"{stem}\.json: metrics file missing"):
        write_summary(PARAMS, paths)
    assert not paths.summary.exists() and not paths.results.exists()


def test_an_unreadable_metrics_file_is_named(tmp_path):
    paths = write_metrics(tmp_path, HAND_MADE)
    (tmp_path / "metrics" / "cam.json").write_bytes(b"\xff\xfe{}")  # not UTF-8
    with pytest.raises(SummaryError, match=r"cam\.json: cannot read"):
        write_summary(PARAMS, paths)
    assert not paths.summary.exists() and not paths.results.exists()


@pytest.mark.parametrize("stem, change, message", [
    ("pseudo", {"miou": 64.0}, "outside \\[0, 1\\]"),
    ("seg_gt", {"miou": None}, "key 'miou' is null and no 'not_scored' reason is given"),
    ("seg_gt", {"miou": "0.5"}, "expected a number"),
    ("weakclip", {"split": "val"}, "must be on the train split"),
    ("seg_pseudo", {"split": None}, "'split' is missing"),
    ("seg_gt", {"miou": 0.0}, "ratio is undefined"),
])
def test_bad_figures_stop_with_the_file_named(tmp_path, stem, change, message):
    broken = {**HAND_MADE, stem: {**HAND_MADE[stem], **change}}
    if change.get("split", "") is None:
        del broken[stem]["split"]
    paths = write_metrics(tmp_path, broken)
    with pytest.raises(SummaryError, match=message):
        write_summary(PARAMS, paths)


def test_a_malformed_ablation_file_is_named(tmp_path):
    paths = write_metrics(tmp_path, HAND_MADE)
    (paths.metrics_root / "ablations_x.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(SummaryError, match="ablations_x.json: an ablation file needs"):
        write_summary(PARAMS, paths)


def test_figures_without_gt_say_not_scored(tmp_path):
    """Issue #18: label-only data. A stage without GT writes ``miou: null`` and its reason; the summary keeps the
    other figures, leaves the missing ones (and a ratio built on one) null and says why in RESULTS.md."""
    no_gt = {"miou": None, "not_scored": "not scored: no GT"}
    changed = {**HAND_MADE, "cam": {**HAND_MADE["cam"], **no_gt},
               "seg_gt": {**HAND_MADE["seg_gt"], "miou": None, "not_scored": "not trained: no GT"}}
    paths = write_metrics(tmp_path, changed)
    summary = write_summary(PARAMS, paths)
    assert summary["cam_miou"] is None and summary["seg_gt_miou"] is None and summary["wsss_fsss_ratio"] is None
    assert summary["pseudo_miou"] == HAND_MADE["pseudo"]["miou"]
    results = paths.results.read_text()
    assert "not scored: no GT" in results and "not trained: no GT" in results


def test_the_clip_section_shows_the_dense_probe_beside_the_random_init(tmp_path):
    clip = {"source": "pretrain", "split": "val", "n_images": 200, "zero_shot_map": 0.369, "random_init_map": 0.182,
            "dense_probe_split": "train", "dense_probe_n_images": 800, "dense_probe_rule": "value path; no threshold",
            "dense_probe_threshold_chosen_with_gt": False, "dense_probe_miou": 0.254,
            "random_init_dense_probe_miou": 0.071, "last_layer_probe_rule": "last-layer tokens",
            "last_layer_probe_miou": 0.319, "random_init_last_layer_probe_miou": 0.105}
    paths = write_metrics(tmp_path, {**HAND_MADE, "clip": clip})
    write_summary(PARAMS, paths)
    results = paths.results.read_text()
    assert "## Frozen CLIP (`clip.json`)" in results and "Source **pretrain**" in results
    assert "| Dense probe mIoU (MaskCLIP-style) | 25.4 | 7.1 | train | 800 | no |" in results
    assert "| Zero-shot mAP (image level) | 36.9 | 18.2 | val | 200 | no threshold |" in results
    assert "| Dense probe mIoU at WeakCLIP's tokens (last layer) | 31.9 | 10.5 | train | 800 | no |" in results
    assert "Dense probe: value path; no threshold. At WeakCLIP's tokens: last-layer tokens." in results
    # A clip.json from before the probe: its figures show as —; without clip.json there is no section.
    old = {key: value for key, value in clip.items()
           if not key.startswith(("dense_probe", "random_init_dense", "last_layer", "random_init_last"))}
    paths = write_metrics(tmp_path / "old", {**HAND_MADE, "clip": old})
    write_summary(PARAMS, paths)
    assert "| Dense probe mIoU (MaskCLIP-style) | — | — | — | — | unknown |" in paths.results.read_text()
    paths = write_metrics(tmp_path / "none", HAND_MADE)
    write_summary(PARAMS, paths)
    assert "Frozen CLIP" not in paths.results.read_text()


def test_the_headline_over_seeds_follows_the_headline_when_present(tmp_path):
    paths = write_metrics(tmp_path, HAND_MADE)
    write_summary(PARAMS, paths)
    assert "## Headline over seeds" not in paths.results.read_text()
    (paths.metrics_root / "chain_seeds.json").write_text(json.dumps({
        "title": "Headline over training seeds", "description": "Seed 0 is the committed run.",
        "rows": [{"figure": "WSSS / FSSS ratio", "split": "val", "seeds": 3, "per seed": "0.950 / 0.900 / 1.000",
                  "mean": 0.95, "± std": 0.05, "threshold_chosen_with_gt": False}]}))
    write_summary(PARAMS, paths)
    results = paths.results.read_text()
    assert results.index("## Headline\n") < results.index("## Headline over seeds") < results.index("## Per-class")
    assert "| WSSS / FSSS ratio | val | 3 | 0.950 / 0.900 / 1.000 | 0.95 | 0.05 | no |" in results
    (paths.metrics_root / "machine_runs.json").write_text(json.dumps({
        "title": "The committed chain on other machines", "runs": [],
        "rows": [{"figure": "WSSS / FSSS ratio", "split": "val", "committed run": "0.950",
                  "training seeds (3 runs)": "0.900 – 1.000", "AMD": "0.936 (inside)"}]}))
    write_summary(PARAMS, paths)
    results = paths.results.read_text()
    assert (results.index("## Headline over seeds") < results.index("### Headline over training seeds")
            < results.index("### The committed chain on other machines") < results.index("## Per-class"))
    assert "| WSSS / FSSS ratio | val | 0.950 | 0.900 – 1.000 | 0.936 (inside) |" in results


def test_the_segmenter_rows_name_their_evaluation_protocol(tmp_path):
    protocol = {"scales": [0.5, 0.75, 1.0, 1.25, 1.5], "flip": True, "crf": {"iterations": 10}}
    changed = {**HAND_MADE, "seg_pseudo": {**HAND_MADE["seg_pseudo"], "eval": protocol},
               "seg_gt": {**HAND_MADE["seg_gt"], "eval": {"scales": [1.0], "flip": False, "crf": None}}}
    paths = write_metrics(tmp_path, changed)
    write_summary(PARAMS, paths)
    results = paths.results.read_text()
    assert "deeplabv3plus / resnet18; scales 0.5, 0.75, 1, 1.25, 1.5, flip, CRF |" in results
    assert "? / ?; single scale, no flip, no CRF; trained on GT masks |" not in results  # seg_gt: no GT flag here
    assert "? / ?; single scale, no flip, no CRF |" in results


def test_bench_tables_of_another_dataset_are_left_out_and_named(tmp_path):
    """A table without a ``dataset`` key was made on the synthetic benchmark (every one before the key); a VOC
    run's RESULTS.md must not show it under its own headline, and a VOC table shows only under a VOC run."""
    paths = write_metrics(tmp_path, HAND_MADE)
    seeds = {"title": "Headline over training seeds", "rows": [{"figure": "x", "mean": 1.0}]}
    (paths.metrics_root / "chain_seeds.json").write_text(json.dumps(seeds))
    (paths.metrics_root / "ablations_voc.json").write_text(json.dumps({
        "title": "VOC prompts", "dataset": "voc", "split": "train", "threshold_chosen_with_gt": False,
        "rows": [{"setting": "prompt_len=4", "miou": 0.6}]}))
    write_summary(PARAMS, paths)
    synthetic = paths.results.read_text()
    assert "### Headline over training seeds" in synthetic and "### VOC prompts" not in synthetic
    assert "`metrics/ablations_voc.json` (made on the voc dataset)" in synthetic
    write_summary(params_from_dict({"dataset": {"name": "voc", "source": str(tmp_path / "VOC2012")}}), paths)
    voc = paths.results.read_text()
    assert "### VOC prompts" in voc and "### Headline over training seeds" not in voc
    assert "`metrics/chain_seeds.json` (made on the synthetic dataset)" in voc


def test_the_summary_line_gives_each_figure_its_own_not_scored_reason(tmp_path, monkeypatch):
    no_cams = {"miou": None, "not_scored": "not scored: no CAMs (cam.source: none)"}
    paths = write_metrics(tmp_path, {**HAND_MADE, "cam": {**HAND_MADE["cam"], **no_cams}})
    monkeypatch.chdir(tmp_path)  # the stage's line reads ./metrics, as the stage runs in the project folder
    line = summary_line(PARAMS, None, None)
    assert "cam_miou not scored: no CAMs (cam.source: none)" in line and "no GT" not in line
    assert paths.summary.is_file()

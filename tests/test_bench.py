"""The benchmark suite: ``--quick`` end to end (so it cannot rot), and its parts against independent references."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from bench.measure import (class_names, forward_with_clip_gradients, measure_cam_store, quick_size, smooth_cams,
                           training_batch)
from bench.run import (PUBLISHED_REPRO_RECORD, check_finite, collect_stage_timings, main, own_timing,
                       repro_records, stage_names)
from weakclip_core.models.clip import clip_from_config
from weakclip_core.models.weakclip import WeakCLIP

REPO = Path(__file__).resolve().parent.parent

# Every key the results must hold, as paths into results.json; each leaf must be a positive finite number.
POSITIVE_NUMBERS = [
    *(f"training.{model}.{key}" for model in ("weakclip", "weakclip_full_finetune", "mctformer")
      for key in ("images_per_s", "s_per_step", "peak_memory_mib", "trainable_parameters", "total_parameters",
                  "batch_size", "input_size", "cpu_s_per_step", "images_per_cpu_s")),
    *(f"ratios.{key}" for key in ("speed_vs_full_finetune", "cpu_speed_vs_full_finetune", "cpu_speed_vs_mctformer",
                                   "peak_memory_vs_full_finetune",
                                   "train_memory_vs_full_finetune", "trainable_parameters_vs_full_finetune",
                                   "speed_vs_mctformer", "peak_memory_vs_mctformer")),
    "parameters.paper_size.trainable", "parameters.paper_size.total", "parameters.paper_size.trainable_fraction",
    "parameters.measured_weakclip.trainable", "parameters.measured_weakclip.total",
    "pseudo_inference.images_per_s", "pseudo_inference.s_per_image",
    "crf.workers_1.images_per_s", "crf.workers_2.images_per_s", "crf.speedup_2_vs_1",
    "cam_store.synthetic.bytes_per_image", "cam_store.synthetic.raw_float32_bytes_per_image",
    "cam_store.synthetic.compression_ratio", "wall_s",
    *(f"cam_inference.{dataset}.{key}" for dataset in ("voc", "coco")
      for key in ("n_classes", "s_per_image", "peak_memory_mib")),
]


def lookup(results: dict, dotted: str):
    value = results
    for part in dotted.split("."):
        assert isinstance(value, dict) and part in value, f"results.json lacks {dotted} (at {part!r})"
        value = value[part]
    return value


@pytest.mark.slow
def test_quick_suite_writes_every_number(tmp_path: Path) -> None:
    results_path, doc_path = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    assert main(["--quick", "--results", str(results_path), "--doc", str(doc_path)]) == 0
    results = json.loads(results_path.read_text())
    assert results["mode"] == "quick"
    for dotted in POSITIVE_NUMBERS:
        value = lookup(results, dotted)
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (dotted, value)
        assert math.isfinite(value) and value > 0, (dotted, value)
    training = results["training"]
    # Freezing CLIP trains fewer parameters than fine-tuning everything, on the same total.
    assert training["weakclip"]["total_parameters"] == training["weakclip_full_finetune"]["total_parameters"]
    assert training["weakclip"]["trainable_parameters"] < training["weakclip_full_finetune"]["trainable_parameters"]
    assert training["weakclip_full_finetune"]["trainable_parameters"] == training["weakclip"]["total_parameters"]
    assert results["ratios"]["speed_vs_full_finetune"] == pytest.approx(
        training["weakclip"]["images_per_s"] / training["weakclip_full_finetune"]["images_per_s"])
    # The paper-size model: docs/METHOD.md's 21.24M trainable of 171.46M (K = 21).
    paper = results["parameters"]["paper_size"]
    assert abs(paper["trainable"] / 1e6 - 21.24) < 0.1 and abs(paper["total"] / 1e6 - 171.46) < 0.2
    timings = results["stage_timings"]
    for stage, seconds in timings["seconds"].items():
        assert math.isfinite(seconds) and seconds > 0 and timings["sources"][stage]
    assert set(timings["seconds"]) | set(timings["missing"]) == set(stage_names(REPO))
    page = doc_path.read_text()
    assert "$" not in page.replace("$ ", "")  # every template field was filled
    assert "WeakCLIP, CLIP unfrozen (full fine-tuning)" in page and "| 2 |" in page


def tiny_weakclip() -> WeakCLIP:
    size = quick_size()
    torch.manual_seed(0)
    return WeakCLIP(clip_from_config(size.clip_config), class_names(size.n_classes), size.weakclip)


def test_full_finetune_forward_is_weakclips_forward_with_gradients_into_clip() -> None:
    model = tiny_weakclip().eval()
    images = training_batch(quick_size(), torch.device("cpu"))["image"]
    reference = model(images)
    for parameter in model.clip.parameters():
        parameter.requires_grad_(True)
    unfrozen = forward_with_clip_gradients(model, images)
    # Equal up to float rounding: under no_grad PyTorch's attention takes its fused inference path.
    torch.testing.assert_close(unfrozen.logits, reference.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unfrozen.matching, reference.matching, rtol=1e-4, atol=1e-5)
    unfrozen.logits.square().mean().backward()
    visual_gradient = model.clip.visual.conv1.weight.grad
    assert visual_gradient is not None and visual_gradient.abs().sum() > 0
    # WeakCLIP's own forward leaves the visual tower without gradient even when it is trainable.
    model.zero_grad(set_to_none=True)
    model(images).logits.square().mean().backward()
    assert model.clip.visual.conv1.weight.grad is None


def test_training_batch_seeds_hold_classes_and_ignore() -> None:
    batch = training_batch(quick_size(), torch.device("cpu"))
    seeds = batch["seed_mask"]
    values = set(torch.unique(seeds).tolist())
    assert 255 in values and values - {255} <= set(range(quick_size().n_classes))
    ignored = (seeds == 255).float().mean().item()
    assert 0.15 < ignored < 0.35  # a quarter of the pixels, by construction
    assert batch["raw_image"].dtype == torch.uint8


def test_cam_store_size_against_raw_float32() -> None:
    size = quick_size()
    record = measure_cam_store(size)
    height, width = size.cam_image
    assert record["raw_float32_bytes_per_image"] == size.cam_present * height * width * 4
    assert record["compression_ratio"] == pytest.approx(record["raw_float32_bytes_per_image"]
                                                        / record["bytes_per_image"])
    # float16 alone halves the bytes; smooth maps compress further (HDF5 overhead aside).
    assert record["compression_ratio"] > 1.5


def test_smooth_cams_are_valid_cams() -> None:
    cams = smooth_cams(np.random.default_rng(1), 3, 20, 30)
    assert cams.shape == (3, 20, 30) and cams.dtype == np.float32
    assert cams.min() >= 0 and np.allclose(cams.reshape(3, -1).max(axis=1), 1.0)


def test_stage_wall_time_read_from_its_timings_record(tmp_path: Path) -> None:
    """timings/<stage>.json as pipeline/_stage.py writes it; a missing, broken or zero record is no record."""
    (tmp_path / "clip.json").write_text(json.dumps({"stage": "clip", "wall_s": 12.5,
                                                    "finished_at": "2026-11-27T10:00:00+00:00"}))
    (tmp_path / "prepare.json").write_text("{")
    (tmp_path / "summary.json").write_text(json.dumps({"stage": "summary", "wall_s": 0}))
    assert own_timing(tmp_path, "prepare") is None and own_timing(tmp_path, "summary") is None
    assert own_timing(tmp_path, "cam_train") is None
    seconds, source = own_timing(tmp_path, "clip")
    assert seconds == 12.5 and source.endswith("clip.json, finished 2026-11-27T10:00:00+00:00")


def test_stage_timings_prefer_the_stages_own_records(tmp_path: Path) -> None:
    stages = stage_names(REPO)
    timings_dir = tmp_path / "timings"
    timings_dir.mkdir()
    for index, stage in enumerate(stages):
        (timings_dir / f"{stage}.json").write_text(json.dumps({"stage": stage, "wall_s": 10.0 + index}))
    repro_file = tmp_path / "repro_timing.json"
    repro_file.write_text(json.dumps({"measured_on": "2026-01-02", "stages": {stage: 3.0 for stage in stages}}))
    timings = collect_stage_timings(REPO, measure_missing=False, timings_dir=timings_dir, repro_records=(repro_file,))
    assert timings["missing"] == [] and list(timings["seconds"]) == stages
    assert timings["seconds"] == {stage: 10.0 + index for index, stage in enumerate(stages)}
    assert timings["sources"]["seg_train@gt"].endswith("seg_train@gt.json, finished undated")
    assert timings["total_s"] == pytest.approx(sum(timings["seconds"].values()))


def test_stage_timings_fall_back_to_the_make_repro_record(tmp_path: Path) -> None:
    """A stage with no timings/ record takes the first make repro record that has it, named as its source."""
    stages = stage_names(REPO)
    timings_dir = tmp_path / "timings"
    timings_dir.mkdir()
    (timings_dir / "clip.json").write_text(json.dumps({"stage": "clip", "wall_s": 100.0}))
    local, published = tmp_path / "repro_synthetic.json", tmp_path / "repro_timing.json"
    published.write_text(json.dumps({"measured_on": "2026-01-01", "stages": {stage: 9.0 for stage in stages}}))
    timings = collect_stage_timings(REPO, measure_missing=False, timings_dir=timings_dir,
                                    repro_records=(local, published))
    assert timings["seconds"]["clip"] == 100.0 and timings["sources"]["seg_train@gt"] == \
        "make repro (" + str(published) + ", 2026-01-01)"
    local.write_text(json.dumps({"measured_on": "2026-01-02", "stages": {stage: 3.0 for stage in stages[1:]}}))
    timings = collect_stage_timings(REPO, measure_missing=False, timings_dir=timings_dir,
                                    repro_records=(local, published))
    # The first record found is used alone: its stages take its times, a stage it lacks is missing.
    from_repro = [stage for stage in stages if timings["sources"].get(stage, "").startswith("make repro")]
    assert stages[0] == "prepare" and from_repro == [stage for stage in stages[1:] if stage != "clip"]
    assert all(timings["seconds"][stage] == 3.0 for stage in from_repro)
    assert timings["missing"] == ["prepare"]


def test_a_voc_run_reads_its_own_make_repro_record_never_the_synthetic_one(tmp_path: Path) -> None:
    """The stand-in for a stage's time is the last make repro of params.yaml's dataset: a VOC bench must not
    report the committed synthetic CPU times as its stage times."""
    timings_dir = tmp_path / "timings"
    assert repro_records("voc", timings_dir) == (timings_dir / "repro_voc.json",)
    assert repro_records("synthetic", timings_dir) == (timings_dir / "repro_synthetic.json", PUBLISHED_REPRO_RECORD)
    stages = stage_names(REPO)
    timings_dir.mkdir()
    timings = collect_stage_timings(REPO, measure_missing=False, timings_dir=timings_dir,
                                    repro_records=repro_records("voc", timings_dir))
    assert timings["seconds"] == {} and timings["missing"] == stages  # not the published synthetic record's
    (timings_dir / "repro_voc.json").write_text(json.dumps({"measured_on": "2026-05-01",
                                                             "stages": {stage: 600.0 for stage in stages}}))
    timings = collect_stage_timings(REPO, measure_missing=False, timings_dir=timings_dir,
                                    repro_records=repro_records("voc", timings_dir))
    assert timings["missing"] == [] and set(timings["seconds"].values()) == {600.0}
    assert timings["sources"]["weakclip_train"] == f"make repro ({timings_dir / 'repro_voc.json'}, 2026-05-01)"


def test_check_finite_names_the_bad_number() -> None:
    check_finite({"a": [1.0, {"b": 2}], "c": "text"})
    with pytest.raises(ValueError, match=r"a\[1\]\.b"):
        check_finite({"a": [1.0, {"b": float("nan")}]})


def test_cam_store_reader_sees_what_the_benchmark_measured(tmp_path: Path) -> None:
    """measure_existing_cam_store counts raw bytes from the stored shapes (independent of compression)."""
    from bench.measure import measure_existing_cam_store
    from weakclip_core.artifacts.cam_store import CamStoreWriter

    path = tmp_path / "train.h5"
    with CamStoreWriter(path, "toy", ["background", "a", "b"], {}) as writer:
        writer.add("x", [1], np.zeros((1, 10, 12), dtype=np.float32))
        writer.add("y", [1, 2], np.full((2, 8, 8), 0.5, dtype=np.float32))
    record = measure_existing_cam_store(path)
    assert record["n_images"] == 2
    assert record["raw_float32_bytes_per_image"] == (1 * 10 * 12 + 2 * 8 * 8) * 4 / 2
    with h5py.File(path, "r") as handle:
        assert set(handle) == {"x", "y"}
    assert measure_existing_cam_store(tmp_path / "absent.h5") is None


def test_repro_timing_durations_and_readme_block(tmp_path: Path) -> None:
    from bench.repro_timing import END_MARKER, START_MARKER, markdown_table, stage_durations, update_readme

    durations = stage_durations([(10.0, "prepare"), (22.5, "clip"), (100.0, "summary")], finished_at=101.0)
    assert durations == {"prepare": 12.5, "clip": 77.5, "summary": 1.0}
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{START_MARKER}\nold\n{END_MARKER}\nrest\n", encoding="utf-8")
    record = {"measured_on": "2026-11-26", "machine": "2 CPU cores", "stages": durations, "total_s": 101.0}
    assert update_readme(readme, markdown_table(record))
    text = readme.read_text(encoding="utf-8")
    assert "old" not in text and text.startswith("intro\n") and text.endswith(f"{END_MARKER}\nrest\n")
    assert "| `clip` | 1.3 min (78 s) |" in text and "3 stages ran" in text and "**1.7 min (101 s)**" in text
    assert text.count("Measured by `make repro` on 2026-11-26 (2 CPU cores)") == 1
    forced = markdown_table({**record, "command": "dvc repro -f "})
    assert forced.startswith("Measured by `make repro`'s script run as `dvc repro -f` on 2026-11-26")
    (tmp_path / "plain.md").write_text("no markers\n", encoding="utf-8")
    assert not update_readme(tmp_path / "plain.md", "x")
    assert (tmp_path / "plain.md").read_text(encoding="utf-8") == "no markers\n"


def test_make_repro_keeps_its_record_out_of_git_and_the_readme(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """make repro prints its table and writes only timings/repro_<dataset>.json; a partial run writes nothing."""
    from bench.repro_timing import record_run

    timings_dir = tmp_path / "timings"
    record = {"measured_on": "2026-11-26", "machine": "8 CPU cores", "command": "dvc repro", "dataset": "voc",
              "stages": {"prepare": 600.0}, "total_s": 600.0}
    assert record_run(record, {"clip"}, timings_dir) is None and not timings_dir.exists()
    assert "partial run" in capsys.readouterr().out
    assert record_run(record, set(), timings_dir) == timings_dir / "repro_voc.json"
    assert json.loads((timings_dir / "repro_voc.json").read_text())["total_s"] == 600.0
    out = capsys.readouterr().out
    assert "| `prepare` | 10.0 min (600 s) |" in out and "make timing-table" not in out
    assert record_run({**record, "dataset": "synthetic"}, set(), timings_dir) == timings_dir / "repro_synthetic.json"
    assert "make timing-table" in capsys.readouterr().out
    assert sorted(path.name for path in tmp_path.rglob("*") if path.is_file()) == ["repro_synthetic.json",
                                                                                  "repro_voc.json"]


def test_timing_table_publishes_only_the_synthetic_record(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """make timing-table: the last full synthetic run -> README block + bench/repro_timing.json; else exit 1."""
    from bench.repro_timing import END_MARKER, START_MARKER, write_readme

    timings_dir, timing_file, readme = tmp_path / "timings", tmp_path / "repro_timing.json", tmp_path / "README.md"
    original = f"intro\n{START_MARKER}\nold table\n{END_MARKER}\n"
    readme.write_text(original, encoding="utf-8")
    timings_dir.mkdir()
    voc = {"measured_on": "2026-11-26", "machine": "8 CPU cores", "command": "dvc repro", "dataset": "voc",
           "stages": {"prepare": 600.0}, "total_s": 600.0}
    (timings_dir / "repro_voc.json").write_text(json.dumps(voc))
    assert write_readme(timings_dir, timing_file, readme) == 1
    assert "no full-chain record" in capsys.readouterr().err
    assert readme.read_text(encoding="utf-8") == original and not timing_file.exists()
    synthetic = {**voc, "dataset": "synthetic", "stages": {"prepare": 9.0, "clip": 119.0}, "total_s": 128.0}
    (timings_dir / "repro_synthetic.json").write_text(json.dumps(synthetic))
    assert write_readme(timings_dir, timing_file, readme) == 0
    assert json.loads(timing_file.read_text()) == {"records": [synthetic]}
    text = readme.read_text(encoding="utf-8")
    assert "old table" not in text and "| `clip` | 2.0 min (119 s) |" in text
    assert "- A: 8 CPU cores, 2026-11-26\n" in text and "| **total `dvc repro`** | **2.1 min (128 s)** |" in text


def test_timing_table_keeps_one_record_per_machine_kind(tmp_path: Path) -> None:
    """A run replaces its own CPU kind's published record and keeps the others' (newest first), one README
    column each; a stage one record lacks shows '-'."""
    from bench.repro_timing import END_MARKER, START_MARKER, write_readme

    timings_dir, timing_file, readme = tmp_path / "timings", tmp_path / "repro_timing.json", tmp_path / "README.md"
    timings_dir.mkdir()
    readme.write_text(f"{START_MARKER}\n{END_MARKER}\n", encoding="utf-8")
    amd = {"measured_on": "2026-12-02", "machine": "2 CPU cores, AMD EPYC", "command": "dvc repro",
           "dataset": "synthetic", "stages": {"prepare": 7.0, "clip": 349.0}, "total_s": 1290.0}
    intel = {**amd, "measured_on": "2026-12-04", "machine": "2 CPU cores, Intel Xeon",
             "stages": {"prepare": 4.0, "clip": 275.0, "summary": 1.0}, "total_s": 1092.0}
    for record in (amd, intel):
        (timings_dir / "repro_synthetic.json").write_text(json.dumps(record))
        assert write_readme(timings_dir, timing_file, readme) == 0
    assert json.loads(timing_file.read_text())["records"] == [intel, amd]
    text = readme.read_text(encoding="utf-8")
    assert "- A: 2 CPU cores, Intel Xeon, 2026-12-04\n- B: 2 CPU cores, AMD EPYC, 2026-12-02\n" in text
    assert "| `clip` | 4.6 min (275 s) | 5.8 min (349 s) |" in text and "| `summary` | 0.0 min (1 s) | - |" in text
    assert "| **total `dvc repro`** | **18.2 min (1092 s)** | **21.5 min (1290 s)** |" in text
    later_amd = {**amd, "measured_on": "2026-12-05", "total_s": 1200.0}
    (timings_dir / "repro_synthetic.json").write_text(json.dumps(later_amd))
    assert write_readme(timings_dir, timing_file, readme) == 0
    assert json.loads(timing_file.read_text())["records"] == [later_amd, intel]


def test_a_record_made_before_cpu_models_were_named_is_replaced_by_its_kinds_next_run(tmp_path: Path) -> None:
    """The AMD record of 2026-12-02 says only "AMD EPYC (model not recorded)": the next AMD EPYC run replaces it and
    stands in for it (a description match alone never would); another vendor's does not. More than 8 kinds keep
    one legend line and one column each."""
    from bench.repro_timing import published_table, same_kind, stand_in_record, with_record

    legacy = {"machine": "2 CPU cores, AMD EPYC (model not recorded) (x86_64), OMP_NUM_THREADS=unset",
              "measured_on": "2026-12-02", "stages": {"clip": 349.0}, "total_s": 349.0}
    intel = {**legacy, "machine": "2 CPU cores, Intel(R) Xeon(R) Processor, family 6 model 167 (x86_64), "
                                  "OMP_NUM_THREADS=unset", "measured_on": "2026-12-04"}
    amd = {**legacy, "machine": "2 CPU cores, AMD EPYC 7B13, family 25 model 1 (x86_64), OMP_NUM_THREADS=unset",
           "measured_on": "2026-12-06"}
    assert same_kind(legacy["machine"], amd["machine"]) and not same_kind(legacy["machine"], intel["machine"])
    assert not same_kind(amd["machine"], legacy["machine"])  # only the unmarked side's description may extend it
    assert with_record([intel, legacy], amd) == [amd, intel]
    published = tmp_path / "repro_timing.json"
    published.write_text(json.dumps({"records": [intel, legacy]}))
    assert stand_in_record(published, amd["machine"]) == legacy
    many = [{**legacy, "machine": f"kind {index}"} for index in range(9)]
    table = published_table(many)
    assert "- I: kind 8, 2026-12-02" in table and "| stage | A | B | C | D | E | F | G | H | I |" in table
    assert "|---|" + "---|" * 9 + "\n" in table and "| `clip` | " + " | ".join(["5.8 min (349 s)"] * 9) + " |" in table


def test_published_stand_in_is_this_machine_kinds_record(tmp_path: Path) -> None:
    from bench.repro_timing import stand_in_record

    published = tmp_path / "repro_timing.json"
    assert stand_in_record(published, "any") is None
    newest, older = {"machine": "kind A", "stages": {"clip": 1.0}}, {"machine": "kind B", "stages": {"clip": 2.0}}
    published.write_text(json.dumps({"records": [newest, older]}))
    assert stand_in_record(published, "kind B") == older and stand_in_record(published, "kind C") == newest
    own = tmp_path / "repro_synthetic.json"
    own.write_text(json.dumps(older))
    assert stand_in_record(own, "kind A") == older  # a machine's own record is taken as it is


def test_cpu_model_names_the_first_processor_with_family_and_model(tmp_path: Path) -> None:
    from bench.repro_timing import cpu_model

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
                       "model name\t: AMD EPYC 7B13\nflags\t\t: fpu: vme\n\n"
                       "processor\t: 1\ncpu family\t: 6\nmodel\t\t: 167\nmodel name\t: other\n")
    assert cpu_model(cpuinfo) == "AMD EPYC 7B13, family 25 model 1"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: ARMv8 Processor\n")
    assert cpu_model(cpuinfo) == "ARMv8 Processor"


def test_make_repro_writes_only_git_ignored_files() -> None:
    """What make repro's timer and the stages write for timing is ignored by git: `git status` stays clean."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for relative in ("timings/repro_synthetic.json", "timings/seg_train@gt.json", "timings/clip.json"):
        completed = subprocess.run(["git", "check-ignore", "-q", relative], cwd=REPO)
        assert completed.returncode == 0, f"{relative} is not git-ignored"
    makefile = (REPO / "Makefile").read_text()
    repro_recipe = makefile.split("\nrepro:", 1)[1].split("\n\n", 1)[0]
    assert "bench.repro_timing" in repro_recipe and "--write-readme" not in repro_recipe
    assert "bench.repro_timing --write-readme" in makefile.split("\ntiming-table:", 1)[1].split("\n\n", 1)[0]


def test_gpu_section_lists_each_record(tmp_path: Path) -> None:
    from bench.run import gpu_section

    assert "No GPU record yet" in gpu_section([])
    record = {"device": "cuda", "device_name": "Card X", "input_size": 512, "n_classes": 21, "batch_size": 8,
              "amp": False, "s_per_step": 0.25, "images_per_s": 32.0, "peak_max_memory_allocated_gib": 4.5,
              "trainable_parameters": 21_240_853, "total_parameters": 171_497_494}
    path = tmp_path / "gpu_check_speed_x.json"
    path.write_text(json.dumps(record), encoding="utf-8")
    table = gpu_section([path])
    assert "| Card X | 512 | 21 | 8 | fp32 | 0.250 | 32.0 | 4.50 | 21.24M / 171.50M |" in table


def test_ablation_rows_from_exp_show_json() -> None:
    """`dvc exp show --json` shape (baseline → experiments → revs → data.metrics.<file>.data); a queued
    experiment has no metrics yet and is left out; each variant's seeds give mean ± sample std, the paired
    difference from the baseline (seed for seed over the offsets both ran; none shared: no difference), and the
    mean gain over the CAM seeds, all in points (worked by hand below)."""
    from bench.ablations import ablation_rows, experiment_metrics

    def revision(name: str, miou: float | None) -> dict:
        metrics = {"metrics/weakclip.json": {"data": {"miou": miou, "split": "train"}}} if miou is not None else {}
        return {"rev": "f" * 40, "name": name, "data": {"metrics": metrics}, "error": None, "experiments": None}

    runs = {"abl-baseline-s1": 0.60, "abl-baseline-s2": 0.62, "abl-baseline-s3": 0.64,
            "abl-prompt-2-s1": 0.50, "abl-prompt-2-s2": 0.56, "abl-temp-1-s1": None, "not-ours": 0.9}
    exp_show = [{"rev": "workspace", "name": None, "experiments": None},
                {"rev": "a" * 40, "name": "main", "experiments": [
                    {"name": name, "revs": [revision(name, miou)]} for name, miou in runs.items()]}]
    found = experiment_metrics(exp_show)
    assert "abl-temp-1-s1" not in found and found["abl-prompt-2-s2"] == {"miou": 0.56, "split": "train"}
    rows = ablation_rows(found, cam_miou=0.40)
    assert [row["experiments"] for row in rows] == ["abl-baseline-s{1,2,3}", "abl-prompt-2-s{1,2}"]
    baseline, prompt = rows
    # Baseline: mean 0.62; sample std sqrt((0.02² + 0 + 0.02²) / 2) = 0.02 -> 2.0 points.
    assert baseline["weakclip_miou (mean)"] == pytest.approx(0.62) and baseline["± std (points)"] == 2.0
    assert baseline["seeds"] == 3 and baseline["per seed (points)"] == "60.0 / 62.0 / 64.0"
    assert baseline["vs baseline (points)"] == 0.0 and baseline["gain over CAM seeds (points)"] == 22.0
    # N = 2: mean 0.53; std sqrt((0.03² + 0.03²) / 1) = 0.0424 -> 4.2 points. Against the baseline seed for
    # seed at the offsets both ran (1, 2): (0.50 - 0.60 + 0.56 - 0.62) / 2 = -0.08 -> 8 points under it (the
    # unpaired means would say 9: the baseline's third seed, which N = 2 did not run, is its best).
    assert prompt["weakclip_miou (mean)"] == pytest.approx(0.53) and prompt["± std (points)"] == 4.2
    assert prompt["vs baseline (points)"] == -8.0 and prompt["gain over CAM seeds (points)"] == 13.0
    assert prompt["setting"] == "N = 2 learnable contexts"
    # A variant whose seed offsets the baseline never ran has no paired difference.
    unpaired = ablation_rows({**found, "abl-prompt-4-s7": {"miou": 0.7}}, cam_miou=0.40)
    assert next(row for row in unpaired if row["experiments"] == "abl-prompt-4-s{7}")["vs baseline (points)"] is None
    # The boundary study's table holds its own variants only (the baseline's experiments are shared).
    from bench.ablations import BOUNDARY_STUDY
    assert [row["experiments"] for row in ablation_rows(found, 0.40, BOUNDARY_STUDY)] == ["abl-baseline-s{1,2,3}"]


def test_collect_counts_only_experiments_of_commits_whose_committed_run_is_this_one(tmp_path: Path) -> None:
    """Three commits of a repository: the first committed another run (weakclip_train's model differs), the
    second an output-changing re-run, the third a code-only change (deps differ, outputs equal the second's).
    Experiments hang off each. Only the second's and the third's count; the first is named as left out; the
    workspace entry is kept; a stage the experiments do not depend on (summary) may differ freely."""
    from bench.ablations import baselines_with_these_outputs

    def lock(model_md5: str, code_md5: str, summary_md5: str) -> dict:
        return {"schema": "2.0", "stages": {
            "cam_infer": {"deps": [{"path": "pipeline/cam_infer.py", "md5": code_md5}],
                          "outs": [{"path": "artifacts/cams", "md5": "cams.dir"}]},
            "weakclip_train": {"deps": [{"path": "artifacts/cams", "md5": "cams.dir"}],
                               "outs": [{"path": "artifacts/weakclip/model.pt", "md5": model_md5}]},
            "summary": {"outs": [{"path": "docs/RESULTS.md", "md5": summary_md5}]}}}

    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, env=env, check=True)
    commits = []
    for model, code, summary in (("old-model", "code-1", "r1"), ("new-model", "code-1", "r2"),
                                 ("new-model", "code-2", "r3")):
        (tmp_path / "dvc.lock").write_text(json.dumps(lock(model, code, summary)))  # JSON is YAML
        subprocess.run(["git", "add", "dvc.lock"], cwd=tmp_path, env=env, check=True)
        subprocess.run(["git", "commit", "-qm", model], cwd=tmp_path, env=env, check=True)
        commits.append(subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, env=env, check=True,
                                      capture_output=True, text=True).stdout.strip())
    exp_show = [{"rev": "workspace", "name": None, "experiments": None},
                *({"rev": commit, "name": None, "experiments": [{"name": f"abl-baseline-s{index}", "revs": []}]}
                  for index, commit in enumerate(commits, start=1))]
    here = lock("new-model", "code-2", "r4")  # the workspace: collect has since rewritten RESULTS.md
    kept, left_out = baselines_with_these_outputs(exp_show, tmp_path, here, ("cam_infer", "weakclip_train"))
    assert [entry["rev"] for entry in kept] == ["workspace", commits[1], commits[2]]
    assert left_out == [commits[0]]
    # A commit that has no dvc.lock at all ran nothing this table can use.
    kept, left_out = baselines_with_these_outputs([{"rev": "f" * 40, "experiments": [{"name": "x-s1"}]}], tmp_path,
                                                  here, ("weakclip_train",))
    assert kept == [] and left_out == ["f" * 40]


@pytest.mark.slow
def test_every_commits_experiments_are_read_without_all_commits(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A real DVC project: an experiment on the first commit, a README commit (the committed run unchanged) with one
    of its own, then a re-run with another value committed. `dvc exp list --all-commits` names the two commits
    with experiments and only those are shown (`--all-commits` read all 398 of this history: 44 s); both count
    until the committed run changes, then both are left out, as `collect` must."""
    from bench import ablations

    project = tmp_path / "project"
    project.mkdir()
    env = {"DVC_NO_ANALYTICS": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid", "HOME": str(tmp_path)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(ablations, "REPO", project)
    (project / "params.yaml").write_text("scale: 1.0\n")
    (project / "score.py").write_text("import json, pathlib, yaml\npathlib.Path('metrics').mkdir(exist_ok=True)\n"
                                      "json.dump({'miou': yaml.safe_load(open('params.yaml'))['scale']}, "
                                      "open('metrics/score.json', 'w'))\n")
    (project / "dvc.yaml").write_text("stages:\n  score:\n    cmd: python score.py\n    deps: [score.py]\n"
                                      "    params: [scale]\n    metrics:\n      - metrics/score.json:\n"
                                      "          cache: false\n")

    def run(*command: str) -> str:
        return subprocess.run(command, cwd=project, env=env, check=True, capture_output=True, text=True).stdout

    dvc = [sys.executable, "-m", "dvc"]
    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    run(*dvc, "repro", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "base")
    first = run("git", "rev-parse", "HEAD").strip()
    run(*dvc, "exp", "run", "-q", "-S", "scale=2", "-n", "e-first")
    run("git", "reset", "-q", "--hard")  # `dvc exp run` leaves its result in the workspace
    (project / "README.md").write_text("notes\n")
    run("git", "add", "README.md")
    run("git", "commit", "-qm", "docs")
    second = run("git", "rev-parse", "HEAD").strip()
    run(*dvc, "exp", "run", "-q", "-S", "scale=3", "-n", "e-second")
    run("git", "reset", "-q", "--hard")
    run("git", "commit", "--allow-empty", "-qm", "no experiments here")
    assert sorted(ablations.commits_with_experiments(project)) == sorted([first, second])
    shown = ablations.experiments_of_this_benchmark(["score"])
    names = {experiment["name"] for entry in shown for experiment in entry.get("experiments") or []}
    assert names == {"e-first", "e-second"}
    assert ablations.experiment_metrics(shown, "metrics/score.json") == {"e-first": {"miou": 2}, "e-second": {"miou": 3}}

    (project / "params.yaml").write_text("scale: 1.5\n")  # the committed run changes: the experiments ran another one
    run(*dvc, "repro", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "another run")
    shown = ablations.experiments_of_this_benchmark(["score"])
    assert not [experiment for entry in shown for experiment in entry.get("experiments") or []]


def test_ablation_rows_with_heldout_val_scores() -> None:
    """``collect --heldout`` adds each experiment's val scores (bench.heldout); the rows then carry the val
    mean ± std, per seed, the paired difference from the baseline's val and the labels-given mean beside the train
    figures (worked by hand below); a variant without val scores keeps the train columns only."""
    from bench.ablations import VAL_LABELLED_MIOU, VAL_MIOU, ablation_rows, experiment_runs

    revision = {"rev": "c" * 40, "name": "abl-baseline-s1", "error": None, "experiments": None,
                "data": {"metrics": {"metrics/weakclip.json": {"data": {"miou": 0.7}}}}}
    exp_show = [{"rev": "a" * 40, "name": "main", "experiments": [{"name": "abl-baseline-s1", "revs": [revision]}]}]
    assert experiment_runs(exp_show) == {"abl-baseline-s1": ("c" * 40, {"miou": 0.7})}
    # A failed run is listed with an error and the metrics of the commit it started from: not a result.
    failed = {**revision, "rev": "d" * 40, "name": "abl-gt-masks-s1", "error": {"msg": "Experiment run failed"}}
    exp_show[0]["experiments"].append({"name": "abl-gt-masks-s1", "revs": [failed]})
    assert experiment_runs(exp_show) == {"abl-baseline-s1": ("c" * 40, {"miou": 0.7})}

    def scored(train: float, val: float, labelled: float) -> dict:
        return {"miou": train, VAL_MIOU: val, VAL_LABELLED_MIOU: labelled}

    by_name = {"abl-baseline-s1": scored(0.72, 0.63, 0.74), "abl-baseline-s2": scored(0.71, 0.61, 0.72),
               "abl-baseline-s3": scored(0.73, 0.62, 0.73),
               "abl-random-clip-s1": scored(0.72, 0.60, 0.74), "abl-random-clip-s2": scored(0.70, 0.58, 0.72),
               "abl-prompt-2-s1": {"miou": 0.70}}
    baseline, prompt, random_clip = ablation_rows(by_name, cam_miou=0.30)
    # Baseline val: mean 0.62, sample std sqrt((0.01² + 0.01² + 0) / 2) = 0.01 -> 1.0 point; labels given 0.73.
    assert baseline["val_miou, all classes (mean)"] == pytest.approx(0.62) and baseline["val ± std (points)"] == 1.0
    assert baseline["val per seed (points)"] == "63.0 / 61.0 / 62.0" and baseline["val vs baseline (points)"] == 0.0
    assert baseline["val_miou, labels given (mean)"] == pytest.approx(0.73)
    # Random CLIP val: mean 0.59, std sqrt(2 · 0.01² / 1) = 0.0141 -> 1.4; seed for seed (offsets 1, 2) it is
    # (0.60 - 0.63 + 0.58 - 0.61) / 2 = -0.03 -> 3 points under the baseline's val, and on train
    # (0.72 - 0.72 + 0.70 - 0.71) / 2 = -0.005 -> half a point under (the unpaired means: 0.71 vs 0.72, -1.0).
    assert random_clip["val_miou, all classes (mean)"] == pytest.approx(0.59)
    assert random_clip["val ± std (points)"] == 1.4 and random_clip["val vs baseline (points)"] == -3.0
    assert random_clip["vs baseline (points)"] == -0.5
    assert "val_miou, all classes (mean)" not in prompt and prompt["weakclip_miou (mean)"] == pytest.approx(0.70)


_QUEUE_STATUS = """Task     Name                Created    Status
6e1a2b3  abl-baseline-s1     05:31 AM   Success
7f2c3d4  abl-prompt-2-s1     05:31 AM   {second}
8a3d4e5  abl-prompt-2-s2     05:31 AM   Queued
9b4e5f6  abl-temp-1-s1       05:31 AM   Failed

Worker status: {active} active, {idle} idle
"""


def test_queue_status_parsed_and_a_stalled_queue_detected() -> None:
    """`dvc queue status`'s table (one task per line, status last) and its worker line: a queue with tasks
    waiting and no worker alive is stalled; one with an idle worker or a running task is not."""
    from bench.ablations import parse_queue_status

    state = parse_queue_status(_QUEUE_STATUS.format(second="Running", active=1, idle=1))
    assert (state.running, state.queued, state.workers) == (1, 1, 2) and not state.stalled and not state.drained
    assert state.failed == ["9b4e5f6  abl-temp-1-s1       05:31 AM   Failed"]
    stalled = parse_queue_status(_QUEUE_STATUS.format(second="Queued", active=0, idle=0))
    assert (stalled.running, stalled.queued, stalled.workers) == (0, 2, 0) and stalled.stalled
    assert not parse_queue_status(_QUEUE_STATUS.format(second="Queued", active=0, idle=1)).stalled
    assert parse_queue_status("No experiment tasks in the queue.\n\nWorker status: 0 active, 0 idle\n").drained


def test_wait_for_queue_restarts_workers_that_left_a_stalled_queue(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers are started once, then again after two stalled polls in a row (not after one), and the wait
    ends when the queue drains; the failed task left in the table is raised by name."""
    from bench import ablations

    statuses = iter([_QUEUE_STATUS.format(second="Running", active=1, idle=0),
                     _QUEUE_STATUS.format(second="Queued", active=0, idle=0),   # stalled 1
                     _QUEUE_STATUS.format(second="Running", active=1, idle=0),  # a worker came back: reset
                     _QUEUE_STATUS.format(second="Queued", active=0, idle=0),   # stalled 1
                     _QUEUE_STATUS.format(second="Queued", active=0, idle=0),   # stalled 2: restart
                     _QUEUE_STATUS.format(second="Running", active=1, idle=0),
                     "abc1234  abl-temp-1-s1  05:31 AM   Failed\n\nWorker status: 0 active, 1 idle\n"])
    starts: list[int] = []
    monkeypatch.setattr(ablations, "start_workers", lambda jobs, one_thread_each: starts.append(jobs))
    monkeypatch.setattr(ablations, "dvc", lambda *arguments: next(statuses))
    monkeypatch.setattr(ablations.time, "sleep", lambda seconds: None)
    with pytest.raises(RuntimeError, match="abl-temp-1-s1"):
        ablations.wait_for_queue(jobs=2, poll_s=0.0)
    assert starts == [2, 2]


def test_a_task_the_queue_lost_is_queued_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task listed Running with nothing queued and no worker process alive (a worker took it, then shut down on
    its empty-queue check) is killed, its experiment removed and queued again with its own arguments, once; its
    Failed line is then no failure of this queue. A live worker process, or a task still queued, is no loss."""
    from bench import ablations

    lost = "d259762  higher@score-s1  11:51 PM   Running\n\nWorker status: 0 active, 0 idle\n"
    statuses = iter([lost,  # the worker is alive (busy, not answering): no loss
                     lost, lost,  # no worker process: lost after two polls
                     "e111111  higher@score-s1  11:53 PM   Running\n\nWorker status: 0 active, 0 idle\n",
                     "e111111  higher@score-s1  11:53 PM   Success\nd259762  higher@score-s1  11:51 PM   Failed\n"
                     "\nWorker status: 0 active, 0 idle\n"])
    alive = iter([True, False, False, True])
    calls: list[tuple[str, ...]] = []

    def fake_dvc(*arguments: str) -> str:
        calls.append(arguments)
        return next(statuses) if arguments == ("queue", "status") else ""

    starts: list[int] = []
    monkeypatch.setattr(ablations, "start_workers", lambda jobs, one_thread_each: starts.append(jobs))
    monkeypatch.setattr(ablations, "dvc", fake_dvc)
    monkeypatch.setattr(ablations, "queue_worker_alive", lambda repo: next(alive))
    monkeypatch.setattr(ablations.time, "sleep", lambda seconds: None)
    ablations.wait_for_queue(jobs=1, poll_s=0.0, queued={"higher@score-s1": ("-S", "scale=1.2", "score")})
    assert [call for call in calls if call != ("queue", "status")] == [
        ("queue", "kill", "d259762"), ("exp", "remove", "higher@score-s1"),
        ("exp", "run", "--queue", "--name", "higher@score-s1", "-S", "scale=1.2", "score")]
    assert starts == [1, 1]

    # Lost again after its second queueing, or a task this call did not queue: an error naming the way out.
    statuses = iter([lost] * 4)
    alive = iter([False] * 4)
    with pytest.raises(RuntimeError, match=r"`dvc queue kill d259762` and `dvc exp remove higher@score-s1`"):
        ablations.wait_for_queue(jobs=1, poll_s=0.0, queued={"other-s1": ()})


def test_queue_worker_alive_reads_dvc_tasks_worker_records(tmp_path: Path) -> None:
    """dvc-task writes dvc-exp-worker-<n>.json (pid; return code once exited): a worker is alive while its record
    has no return code and its process exists."""
    from bench.ablations import QUEUE_WORKER_RECORDS, queue_worker_alive, task_name

    folder = tmp_path / QUEUE_WORKER_RECORDS
    assert not queue_worker_alive(tmp_path)
    folder.mkdir(parents=True)
    (folder / "dvc-exp-worker-1.json").write_text(json.dumps({"pid": os.getpid(), "returncode": 0}))
    # Above Linux's largest pid_max (2 ** 22): no such process can exist.
    (folder / "dvc-exp-worker-2.json").write_text(json.dumps({"pid": 2 ** 22 + 17, "returncode": None}))
    assert not queue_worker_alive(tmp_path)
    (folder / "dvc-exp-worker-3.json").write_text(json.dumps({"pid": os.getpid(), "returncode": None}))
    assert queue_worker_alive(tmp_path)
    assert task_name("d259762  higher@score-s1         11:51 PM   Running") == "higher@score-s1"
    assert task_name("c79d124             Aug 22, 2022  Running") is None
    assert task_name("c79d124  abl-x-s1   Aug 22, 2022  Failed") == "abl-x-s1"


def test_only_this_queues_failures_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    """A task that had failed before the queue was filled (an interrupted earlier queue) stays in `dvc queue
    status` but does not fail this queue; a task of this queue that fails does, told apart by its task id, so the
    re-queued task of a name that had failed before still raises when it fails again."""
    from bench import ablations

    earlier = "9b4e5f6  abl-gt-masks-s1  02:59 AM   Failed\n"
    workers = "\nWorker status: 0 active, 1 idle\n"
    monkeypatch.setattr(ablations, "start_workers", lambda jobs, one_thread_each: None)
    variant = next(v for v in ablations.CEILING_STUDY if v.name == "abl-gt-masks")
    cases = (("1c2d3e4  abl-gt-masks-s1  06:40 AM   Success\n2d3e4f5  abl-gt-masks-s2  06:40 AM   Success\n", None),
             ("1c2d3e4  abl-gt-masks-s1  06:40 AM   Success\n2d3e4f5  abl-gt-masks-s2  06:40 AM   Failed\n",
              "2d3e4f5  abl-gt-masks-s2"),
             ("1c2d3e4  abl-gt-masks-s1  06:40 AM   Failed\n2d3e4f5  abl-gt-masks-s2  06:40 AM   Success\n",
              "1c2d3e4  abl-gt-masks-s1"))
    for rows, raised in cases:
        statuses = iter([earlier + workers, earlier + rows + workers])
        monkeypatch.setattr(ablations, "dvc", lambda *arguments, statuses=statuses: (
            next(statuses) if arguments[:2] == ("queue", "status") else ""))
        if raised is None:
            ablations.queue_and_run((variant,), (1, 2), jobs=2, poll_s=0.0)
            continue
        with pytest.raises(RuntimeError, match=raised) as error:
            ablations.queue_and_run((variant,), (1, 2), jobs=2, poll_s=0.0)
        assert "9b4e5f6" not in str(error.value)


def test_chain_seed_queue_ignores_an_earlier_failure_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench.chain_seeds queues whole chains the same way: a chain that had failed before (task 9b4e5f6) does not
    fail the new queue; one of the new queue's chains failing does, named by its task id."""
    from bench import ablations, chain_seeds

    earlier = "9b4e5f6  chain-seed1  02:59 AM   Failed\n"
    workers = "\nWorker status: 0 active, 1 idle\n"
    monkeypatch.setattr(ablations, "start_workers", lambda jobs, one_thread_each: None)
    for second, raises in (("Success", False), ("Failed", True)):
        statuses = iter([earlier + workers, earlier + "1c2d3e4  chain-seed1  06:40 AM   Success\n"
                         f"2d3e4f5  chain-seed2  06:40 AM   {second}\n" + workers])
        queued: list[tuple[str, ...]] = []

        def fake_dvc(*arguments: str, statuses=statuses, queued=queued) -> str:
            if arguments[:2] == ("queue", "status"):
                return next(statuses)
            queued.append(arguments)
            return ""

        monkeypatch.setattr(ablations, "dvc", fake_dvc)
        monkeypatch.setattr(chain_seeds, "dvc", fake_dvc)
        if raises:
            with pytest.raises(RuntimeError, match="2d3e4f5  chain-seed2") as error:
                chain_seeds.queue_and_run((1, 2), poll_s=0.0)
            assert "9b4e5f6" not in str(error.value)
        else:
            chain_seeds.queue_and_run((1, 2), poll_s=0.0)
        assert [arguments[4] for arguments in queued] == ["chain-seed1", "chain-seed2"]


def test_from_seed_adds_seeds_to_a_table_already_run(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`--seeds 6 --from-seed 4` queues the named variants at seed offsets 4, 5, 6 only (1..3 already ran);
    the default still queues 1..N; a first seed past --seeds is refused, naming the option."""
    from bench import ablations

    queued: list[tuple[tuple[str, ...], tuple[int, ...]]] = []
    monkeypatch.setattr(ablations, "queue_and_run", lambda variants, offsets, jobs: queued.append(
        (tuple(variant.name for variant in variants), offsets)))
    monkeypatch.setattr(ablations, "collect", lambda table, heldout: Path("table.json"))
    ablations.main(["run", "--only", "abl-baseline", "abl-no-coattention", "--seeds", "6", "--from-seed", "4"])
    ablations.main(["run", "--only", "abl-baseline", "--seeds", "2"])
    assert queued == [(("abl-baseline", "abl-no-coattention"), (4, 5, 6)), (("abl-baseline",), (1, 2))]
    with pytest.raises(SystemExit):
        ablations.main(["run", "--seeds", "3", "--from-seed", "4"])
    assert "--from-seed: between 1 and --seeds (3)" in capsys.readouterr().err


def test_previous_rows_are_carried_only_when_the_baseline_reproduced() -> None:
    """A partial re-run keeps the committed table's other rows only if its baseline's per-seed values equal
    the committed baseline's (hand-made rows: a re-run baseline, N = 2 re-run, and the committed boundary row)."""
    from bench.ablations import BASELINE, VARIANTS, carry_previous_rows

    def row(name: str, per_seed: str) -> dict:
        variant = next(variant for variant in VARIANTS if variant.name == name)
        return {"setting": variant.setting, "experiments": f"{name}-s{{1,2,3}}", "per seed (points)": per_seed}

    new = [row("abl-baseline", "75.7 / 77.0 / 75.8"), row("abl-prompt-2", "70.0 / 71.0 / 72.0")]
    previous = [row("abl-baseline", "75.7 / 77.0 / 75.8"), row("abl-prompt-2", "60.0 / 60.0 / 60.0"),
                row("abl-boundary", "73.8 / 75.6 / 73.0")]
    merged, carried = carry_previous_rows(new, previous)
    # the table's order (baseline, prompt-2, ..., boundary); the re-run prompt-2 wins over the committed one
    assert [entry["experiments"] for entry in merged] == ["abl-baseline-s{1,2,3}", "abl-prompt-2-s{1,2,3}",
                                                          "abl-boundary-s{1,2,3}"]
    assert merged[1]["per seed (points)"] == "70.0 / 71.0 / 72.0" and carried == ["abl-boundary"]
    # a baseline that moved by one tenth on one seed: nothing is carried
    moved = [row("abl-baseline", "75.7 / 77.1 / 75.8"), *new[1:]]
    assert carry_previous_rows(moved, previous) == (moved, [])
    # no baseline in this queue: nothing to compare, nothing carried
    assert carry_previous_rows(new[1:], previous) == (new[1:], [])
    assert BASELINE.setting == merged[0]["setting"]


def test_repro_timing_knows_every_stage_of_the_project() -> None:
    """A full-chain timing needs the whole stage list: the project's dvc.yaml, foreach expanded, by hand."""
    from bench.repro_timing import REPO, all_stage_names

    assert all_stage_names(REPO) == {"prepare", "clip", "cam_train", "cam_infer", "weakclip_train", "pseudo_masks",
                                     "seg_train@pseudo", "seg_train@gt", "seg_eval@pseudo", "seg_eval@gt", "summary"}


def test_chain_seed_spread_from_exp_show_json(tmp_path: Path) -> None:
    """Seed 0 is the committed summary, seeds 1..N the `chain-seed<s>` experiments' metrics/summary.json; each
    figure gets per-seed values, mean ± sample std and range (worked by hand below), and the summary stage
    renders the file after the headline."""
    from bench.ablations import experiment_metrics
    from bench.chain_seeds import spread_rows
    from pipeline.summary import ablation_section

    def summary(cam: float, seg_pseudo: float, ratio: float) -> dict:
        return {"cam_miou": cam, "weakclip_miou": 0.7, "pseudo_miou": 0.8, "seg_pseudo_miou": seg_pseudo,
                "seg_gt_miou": 0.8, "wsss_fsss_ratio": ratio}

    exp_show = [{"rev": "a" * 40, "name": "main", "experiments": [
        {"name": name, "revs": [{"rev": "f" * 40, "name": name,
                                 "data": {"metrics": {"metrics/summary.json": {"data": data}}}}]}
        for name, data in (("chain-seed1", summary(0.30, 0.76, 0.95)), ("chain-seed2", summary(0.36, 0.80, 1.0)),
                           ("abl-baseline-s1", summary(0.9, 0.9, 0.9)))]}]
    found = experiment_metrics(exp_show, "metrics/summary.json")
    flags = {"cam_miou": True, "weakclip_miou": False, "pseudo_miou": False, "seg_pseudo_miou": False,
             "seg_gt_miou": False}
    rows = {row["figure"]: row for row in spread_rows(summary(0.33, 0.78, 0.975), found, flags)}
    cam = rows["CAM seeds (MCTformer-V2)"]
    # 33, 30, 36 points: mean 33, sample std sqrt((0 + 9 + 9) / 2) = 3.0, range 30 - 36.
    assert (cam["per seed"], cam["mean"], cam["± std"], cam["range"]) == ("33.0 / 30.0 / 36.0", 33.0, 3.0,
                                                                          "30.0 – 36.0")
    assert cam["threshold_chosen_with_gt"] is True and cam["seeds"] == 3
    # One more run's 95 % interval: 33 ± t(0.975, 2) * 3.0 * sqrt(1 + 1/3) = 33 ± 4.303 * 3.4641 = 33 ± 14.91.
    assert cam["95% prediction interval"] == "18.1 – 47.9"
    # 78, 76, 80 (seg@pseudo): 78 ± 4.303 * 2 * 1.1547 = 78 ± 9.94, within [0, 100]; cut only past the limits.
    assert rows["Segmenter trained on pseudo masks (WSSS)"]["95% prediction interval"] == "68.1 – 87.9"
    ratio = rows["WSSS / FSSS ratio"]
    # 0.975, 0.95, 1.0: mean 0.975, std sqrt((0 + 0.025² + 0.025²) / 2) = 0.025.
    assert (ratio["per seed"], ratio["mean"], ratio["± std"]) == ("0.975 / 0.950 / 1.000", 0.975, 0.025)
    assert rows["Segmenter trained on pseudo masks (WSSS)"]["split"] == "val"
    assert rows["WeakCLIP prediction"]["± std"] == 0.0
    assert ratio["threshold_chosen_with_gt"] is False  # the ratio takes seg_pseudo's flag
    # What collect stores beside the rows: the unrounded values by key, seed 0 first (the other experiment ignored).
    from bench.chain_seeds import values_by_figure
    stored = values_by_figure(summary(0.33, 0.78, 0.975), found)
    assert stored["cam_miou"] == [0.33, 0.30, 0.36] and stored["wsss_fsss_ratio"] == [0.975, 0.95, 1.0]
    path = tmp_path / "chain_seeds.json"
    path.write_text(json.dumps({"title": "Headline over training seeds", "rows": list(rows.values())}),
                    encoding="utf-8")
    assert ("| CAM seeds (MCTformer-V2) | train | 3 | 33.0 / 30.0 / 36.0 | 33.0 | 3.0 | 30.0 – 36.0 | "
            "18.1 – 47.9 | yes |") in ablation_section(path)


def test_every_ablation_override_names_a_valid_params_key() -> None:
    """Each table's `-S key=value` overrides, applied to the committed params.yaml as `dvc exp run -S` applies
    them (the value parsed as YAML), give params the validator accepts: a misspelt key or a wrong type in a
    variant fails here, not an hour into a queue. Each override also changes the value it names (no row repeats
    the baseline by accident)."""
    import copy

    import yaml

    from bench.ablations import TABLES
    from weakclip_core.config.params import params_from_dict

    committed = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params_from_dict(committed)
    for table in TABLES:
        for variant in table.variants:
            data = copy.deepcopy(committed)
            for override in variant.overrides:
                key, value = override.split("=", 1)
                *parents, leaf = key.split(".")
                node = data
                for part in parents:
                    assert isinstance(node.get(part), dict), f"{variant.name}: {key} is not a params.yaml key"
                    node = node[part]
                assert leaf in node, f"{variant.name}: {key} is not a params.yaml key"
                assert node[leaf] != yaml.safe_load(value), f"{variant.name}: {override} is the committed value"
                node[leaf] = yaml.safe_load(value)
            params_from_dict(data)


def test_every_ablation_table_is_a_dep_of_the_summary() -> None:
    """The summary renders every metrics/ablations*.json, so each must be a dep of its stage (dvc.yaml, read as
    YAML): otherwise `bench.ablations collect` of that table would leave RESULTS.md and dvc.lock stale."""
    import yaml

    from bench.ablations import TABLES

    deps = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]["summary"]["deps"]
    tables = {table.output.relative_to(REPO).as_posix() for table in TABLES}
    committed = {path.relative_to(REPO).as_posix() for path in (REPO / "metrics").glob("ablations*.json")}
    assert tables <= set(deps) and committed <= set(deps)


def test_each_ablation_tables_description_names_the_command_that_queues_that_table(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """RESULTS.md prints ``run_command(table)`` under each table: run as printed (N = 2), the argument parser must
    queue that table's variants and collect that table, not the default grid (the boundary and ceiling tables
    once printed the grid's command)."""
    from bench import ablations

    for table in ablations.TABLES:
        queued: list[tuple] = []
        collected: list[str] = []
        monkeypatch.setattr(ablations, "queue_and_run", lambda variants, seeds, jobs: queued.append((variants, seeds)))
        monkeypatch.setattr(ablations, "collect", lambda chosen, heldout: collected.append(chosen.name) or REPO)
        words = ablations.run_command(table).replace("--seeds N", "--seeds 2").split()
        assert words[:3] == ["python", "-m", "bench.ablations"]
        ablations.main(words[3:])
        assert queued == [(table.variants, (1, 2))] and collected == [table.name]
        # ... and the committed table (what RESULTS.md renders) prints that very command.
        assert f"(`{ablations.run_command(table)}`)" in json.loads(table.output.read_text(encoding="utf-8"))["description"]

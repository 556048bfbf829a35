"""Stage ``summary``: the chain's headline ``metrics/summary.json`` and ``docs/RESULTS.md``, from the metrics files.

``summary.json`` holds exactly ``cam_miou``, ``weakclip_miou``, ``pseudo_miou`` (train split),
``seg_pseudo_miou``, ``seg_gt_miou`` (val split) and ``wsss_fsss_ratio`` = seg_pseudo / seg_gt, all
fractions in [0, 1]. Each figure is the ``miou`` of its metrics file; a missing file, a missing ``miou``
or ``split``, a split other than the configured one, or a value outside [0, 1] stops the stage with a
message naming the file.

``docs/RESULTS.md`` is regenerated whole: the headline table (split, images, mIoU, whether a threshold
was chosen with GT, per figure), per-class IoU, the CAM variant ablation (``metrics/cam.json`` →
``variants``: ``{name: {"miou": ..., "best_threshold": ...}}``) when present, and every
``metrics/ablations*.json``; and, when ``metrics/clip.json`` is there (a DVC dep: always in a chain), the
frozen CLIP's figures beside its random-init reference: the MaskCLIP-style dense probe mIoU (its split, no
threshold) and the image-level zero-shot mAP. ``metrics/chain_seeds.json`` (the headline over training seeds,
``python -m bench.chain_seeds``), when present, follows the headline in the same table format, then
``metrics/machine_runs.json`` (the committed chain re-run on other machines, ``python -m bench.machine_runs``).
Neither is a dvc.yaml dep: the chain's own experiments run this stage before the files exist; the bench
commands that write them re-run the stage themselves. An ablation file has this format::

    {"title": "Prompt length", "description": "optional text",
     "split": "train", "threshold_chosen_with_gt": false,
     "rows": [{"setting": "prompt_len=4", "miou": 0.612, "...": "any other scalar column"}, ...]}

``title`` and ``rows`` are required; columns are the rows' keys in order of first appearance; keys
containing ``iou`` are fractions shown in percent. ``split``/``threshold_chosen_with_gt`` may instead
be given per row.
"""

from __future__ import annotations

import argparse
import json
import re
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from weakclip_core.artifacts.atomic import write_json, write_text
from weakclip_core.config import Params

from pipeline._stage import StageSpec, run_stage, run_stage_cli

SUMMARY_KEYS = ("cam_miou", "weakclip_miou", "pseudo_miou", "seg_pseudo_miou", "seg_gt_miou", "wsss_fsss_ratio")
GT_FLAG_KEYS = ("threshold_chosen_with_gt", "thresholds_chosen_with_gt")


class SummaryError(ValueError):
    """A metrics file is missing or does not hold what the summary needs; the message names it."""


@dataclass(frozen=True)
class Figure:
    """One headline number: its summary key, its metrics file, a label, and which split it must be on."""

    key: str
    stem: str
    label: str
    split_role: str  # "train" or "val"


FIGURES = (
    Figure("cam_miou", "cam", "CAM seeds (MCTformer-V2)", "train"),
    Figure("weakclip_miou", "weakclip", "WeakCLIP prediction", "train"),
    Figure("pseudo_miou", "pseudo", "Pseudo masks (WeakCLIP + CRF)", "train"),
    Figure("seg_pseudo_miou", "seg_pseudo", "Segmenter trained on pseudo masks (WSSS)", "val"),
    Figure("seg_gt_miou", "seg_gt", "Segmenter trained on GT masks (FSSS upper bound)", "val"),
)


@dataclass(frozen=True)
class SummaryPaths:
    metrics_root: Path = Path("metrics")
    results: Path = Path("docs/RESULTS.md")

    @property
    def summary(self) -> Path:
        return self.metrics_root / "summary.json"


def read_metrics(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SummaryError(f"{path}: metrics file missing (run its stage first: dvc repro)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SummaryError(f"{path}: not valid JSON ({error})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SummaryError(f"{path}: cannot read ({error})") from None
    if not isinstance(data, dict):
        raise SummaryError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def fraction(value: Any, where: str) -> float:
    """A number in [0, 1] (percentages and missing values are errors, never silently rescaled)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SummaryError(f"{where}: expected a number in [0, 1], got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise SummaryError(f"{where}: {value} is outside [0, 1] (mIoU must be a fraction, not a percentage)")
    return float(value)


MIOU_COLUMN = re.compile(r"(^|[^a-z])m?iou([^a-z]|$)")
"""An ablation column that holds an mIoU / IoU fraction (shown in percent): ``weakclip_miou (mean)``, ``val_miou,
all classes (mean)``, ``mIoU``; not a word that merely contains the letters (``previous run (points)``)."""


def gt_flag(data: dict[str, Any]) -> bool | None:
    for key in GT_FLAG_KEYS:
        if isinstance(data.get(key), bool):
            return data[key]
    return None


def trained_on_gt(data: dict[str, Any]) -> bool:
    """Whether a stage's figure was trained on GT masks (``gt_used``: WeakCLIP on GT; ``gt_used_in_training``:
    the stages downstream of it, and the segmenter trained on GT)."""
    return bool(data.get("gt_used") or data.get("gt_used_in_training"))


def load_figures(paths: SummaryPaths, splits: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Every headline metrics file, checked: ``miou`` a fraction, ``split`` the configured one."""
    loaded = {}
    for figure in FIGURES:
        path = paths.metrics_root / f"{figure.stem}.json"
        data = read_metrics(path)
        if data.get("miou") is None:  # label-only data: the stage says why it has no figure
            if not isinstance(data.get("not_scored"), str):
                raise SummaryError(f"{path}: key 'miou' is null and no 'not_scored' reason is given")
        else:
            fraction(data.get("miou"), f"{path}: key 'miou'")
        split = data.get("split")
        if not isinstance(split, str):
            raise SummaryError(f"{path}: key 'split' is missing (every figure must state its split)")
        if split != splits[figure.split_role]:
            raise SummaryError(f"{path}: split {split!r}, but {figure.key} must be on the {figure.split_role} "
                               f"split {splits[figure.split_role]!r}")
        loaded[figure.key] = data
    return loaded


def summary_of(figures: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """The headline; a figure a stage could not score (no GT) is ``None``, and so is a ratio built on one."""
    values: dict[str, float | None] = {
        figure.key: None if figures[figure.key]["miou"] is None else float(figures[figure.key]["miou"])
        for figure in FIGURES}
    if values["seg_gt_miou"] is not None and values["seg_gt_miou"] <= 0.0:
        raise SummaryError("seg_gt.json: miou is 0, the WSSS/FSSS ratio is undefined")
    values["wsss_fsss_ratio"] = (None if values["seg_pseudo_miou"] is None or values["seg_gt_miou"] is None
                                 else values["seg_pseudo_miou"] / values["seg_gt_miou"])
    return {key: values[key] for key in SUMMARY_KEYS}


def percent(value: Any) -> str:
    return "—" if value is None else f"{100 * float(value):.1f}"


def yes_no(flag: bool | None) -> str:
    return "unknown" if flag is None else ("yes" if flag else "no")


def figure_note(figure: Figure, data: dict[str, Any]) -> str:
    if data.get("miou") is None:
        return str(data["not_scored"])
    if figure.stem == "cam":
        return (f"variant {data.get('variant', '?')}, best background threshold "
                f"{data.get('best_threshold', '?')} (picked on GT: an upper bound for the seeds)")
    on_gt = "; trained on GT masks (an upper bound, not WSSS)"
    if figure.stem == "weakclip":
        if data.get("gt_used"):
            seeds = "GT masks (an upper bound, not WSSS)"
        elif data.get("seeds_source"):  # a folder of masks: no confident-seed thresholds ran
            seeds = f"imported masks (weakclip.seeds.source: {data['seeds_source']})"
        else:
            seeds = data.get("seed_mode", "?")
        return f"{data.get('inference', 'single scale')}; seeds {seeds}"
    if figure.stem == "pseudo":
        repair = data.get("absent_class_repair") or {}
        repaired = bool(repair.get("odds_ratio"))
        use_crf = data.get("use_crf", True)
        steps = [step for step, on in (("CRF", use_crf), ("absent-class repair", repaired)) if on]
        final = f", after {' + '.join(steps)} {percent(data.get('miou'))}" if steps else ""
        counts = ""
        if repair:
            after_repair = (f"{repair.get('absent_after_repair', '?')} after the repair (odds ratio "
                            f"{repair['odds_ratio']})" if repaired else "repair off")
            counts = (f"; labelled classes with no pixel: {repair.get('absent_before_repair', '?')} of "
                      f"{repair.get('labelled_pairs', '?')} {'after CRF' if use_crf else 'in the prediction'}, "
                      f"{after_repair}")
        before = "before CRF" if use_crf else "no CRF (pseudo.use_crf: false): the prediction"
        return (f"{before} {percent(data.get('miou_before_crf'))}{final};"
                f" scales {data.get('scales', '?')}, flip {data.get('flip', '?')}{counts}"
                f"{on_gt if data.get('gt_used_in_training') else ''}")
    trained_on_gt = "; trained on GT masks" if data.get("gt_used_in_training") else ""
    protocol = f"; {evaluation_protocol(data['eval'])}" if data.get("eval") else ""
    return f"{data.get('model', '?')} / {data.get('encoder', '?')}{protocol}{trained_on_gt}"


def evaluation_protocol(protocol: dict[str, Any]) -> str:
    """seg_eval's ``eval`` record in words: "single scale, no flip, no CRF", "whole views at scales 0.5, ...,
    1.5, flip, CRF"."""
    scales = protocol.get("scales") or []
    scale_words = ("single scale" if scales == [1.0] else f"scale {scales[0]:g}" if len(scales) == 1
                   else f"scales {', '.join(f'{scale:g}' for scale in scales)}")
    flip_words = "flip" if protocol.get("flip") else "no flip"
    whole = "whole views at " if protocol.get("whole_image") else ""
    return f"{whole}{scale_words}, {flip_words}, {'CRF' if protocol.get('crf') else 'no CRF'}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ablation_section(path: Path) -> str:
    """One ``metrics/ablations*.json`` (format in the module docstring) as a titled table."""
    data = read_metrics(path)
    if not isinstance(data.get("title"), str) or not isinstance(data.get("rows"), list) or not data["rows"]:
        raise SummaryError(f"{path}: an ablation file needs 'title' (text) and 'rows' (a non-empty list of "
                           "objects); see pipeline/summary.py for the format")
    columns: list[str] = []
    for index, row in enumerate(data["rows"]):
        if not isinstance(row, dict):
            raise SummaryError(f"{path}: rows[{index}] is not an object")
        columns += [key for key in row if key not in columns]

    def cell(key: str, value: Any) -> str:
        if value is None:
            return "—"
        if isinstance(value, bool):
            return yes_no(value)
        if MIOU_COLUMN.search(key.lower()) and isinstance(value, (int, float)):
            return percent(fraction(value, f"{path}: {key}"))
        return str(value)

    parts = [f"### {data['title']} (`{path.name}`)"]
    if data.get("description"):
        parts.append(str(data["description"]))
    facts = []
    if "split" in data:
        facts.append(f"split: {data['split']}")
    if "threshold_chosen_with_gt" in data:
        facts.append(f"threshold chosen with GT: {yes_no(data['threshold_chosen_with_gt'])}")
    if facts:
        parts.append("; ".join(facts) + ".")
    parts.append(markdown_table(columns, [[cell(key, row.get(key)) for key in columns] for row in data["rows"]]))
    return "\n\n".join(parts)


def clip_section(data: dict[str, Any], path: Path) -> str:
    """``metrics/clip.json`` as a small table: the trained (or loaded) CLIP beside a random init of its
    architecture, per patch (dense probe, mIoU) and per image (zero-shot mAP). A figure the file does not
    hold (written before the probe existed, or no GT: ``dense_probe_not_scored``) shows as —."""

    def shown(key: str) -> str:
        value = data.get(key)
        return "—" if value is None else percent(fraction(value, f"{path}: key '{key}'"))

    probe_flag = data.get("dense_probe_threshold_chosen_with_gt")
    rows = [["Dense probe mIoU (MaskCLIP-style)", shown("dense_probe_miou"), shown("random_init_dense_probe_miou"),
             str(data.get("dense_probe_split", "—")), str(data.get("dense_probe_n_images", "—")),
             yes_no(probe_flag if isinstance(probe_flag, bool) else None)],
            ["Dense probe mIoU at WeakCLIP's tokens (last layer)", shown("last_layer_probe_miou"),
             shown("random_init_last_layer_probe_miou"), str(data.get("dense_probe_split", "—")),
             str(data.get("dense_probe_n_images", "—")), yes_no(probe_flag if isinstance(probe_flag, bool) else None)],
            ["Zero-shot mAP (image level)", shown("zero_shot_map"), shown("random_init_map"),
             str(data.get("split", "—")), str(data.get("n_images", "—")), "no threshold"]]
    parts = ["## Frozen CLIP (`clip.json`)",
             f"Source **{data.get('source', '?')}**, beside a randomly initialised CLIP of the same architecture. "
             "In percent."]
    parts.append(markdown_table(["measure", "CLIP", "random init", "split", "images", "threshold chosen with GT"],
                                rows))
    if data.get("dense_probe_rule"):
        parts.append(f"Dense probe: {data['dense_probe_rule']}"
                     + (f" ({data['dense_probe_not_scored']})" if data.get("dense_probe_not_scored") else "") + "."
                     + (f" At WeakCLIP's tokens: {data['last_layer_probe_rule']}." if data.get("last_layer_probe_rule")
                        else ""))
    return "\n\n".join(parts)


def scored_images(data: dict[str, Any]) -> str:
    """How many images the figure's mIoU is over. The pseudo masks are made for every train image but scored on
    ``score_split`` only (VOC: 10,582 made, 1,464 scored): ``n_scored`` there, with the count made beside it."""
    made, scored = data.get("n_images"), data.get("n_scored")
    if scored is None:
        return "?" if made is None else str(made)
    return str(scored) if made in (None, scored) else f"{scored} (of {made} made)"


def chain_paragraph(figures: dict[str, dict[str, Any]]) -> str:
    """What the headline's chain used, from its metrics: GT masks (``weakclip.seeds.source: gt``), imported seed
    masks, or image-level labels only (and then whether a GT-chosen threshold reached the pseudo masks)."""
    opening = "The segmenter trained on GT masks is the fully-supervised upper bound: it uses GT by design. "
    weakclip = figures["weakclip_miou"]
    if any(trained_on_gt(figures[key]) for key in ("weakclip_miou", "pseudo_miou", "seg_pseudo_miou")):
        return (opening + "This chain's WeakCLIP trained on the GT masks (`weakclip.seeds.source: gt`): every figure "
                "downstream of it, the segmenter trained on pseudo masks and the ratio included, is an upper bound "
                "that uses GT, not a WSSS result.")
    if weakclip.get("seeds_source"):
        return (opening + "The chain (imported seed masks → WeakCLIP → pseudo masks → segmenter) uses the imported "
                f"masks (`weakclip.seeds.source: {weakclip['seeds_source']}`) and the image-level labels; no "
                "threshold of its own was chosen with GT.")
    pseudo_flag = gt_flag(figures["pseudo_miou"])
    if pseudo_flag is not False:
        clause = ", except that a threshold upstream of the pseudo masks was chosen with GT (see the table)"
    elif gt_flag(figures["cam_miou"]):
        clause = (": the CAM row's GT-chosen background threshold sets only that row's score (the seeds WeakCLIP "
                  "trains on use fixed thresholds)")
    else:
        clause = ""
    return (opening + "The WSSS chain (seeds → WeakCLIP → pseudo masks → segmenter) uses image-level labels only"
            + clause + ".")


def results_markdown(figures: dict[str, dict[str, Any]], summary: dict[str, float], dataset_name: str,
                     ablation_files: list[Path], clip: tuple[dict[str, Any], Path] | None = None,
                     chain_seeds: Path | None = None, machine_runs: Path | None = None,
                     other_runs: dict[Path, str] | None = None) -> str:
    parts = ["# Results",
             "Generated by `python -m pipeline.summary` (the `summary` stage) from `metrics/*.json`; "
             "edits here are overwritten. mIoU in percent; every figure states its split and whether any "
             f"threshold behind it was chosen with GT. Dataset: **{dataset_name}**.",
             "## Headline"]
    rows = []
    for figure in FIGURES:
        data = figures[figure.key]
        label = figure.label
        if figure.stem == "pseudo" and data.get("use_crf") is False:
            label = "Pseudo masks (WeakCLIP, no CRF)"
        rows.append([label, f"`{figure.stem}.json`", str(data["split"]), scored_images(data),
                     percent(data["miou"]), yes_no(gt_flag(data)), figure_note(figure, data)])
    ratio = summary["wsss_fsss_ratio"]
    rows.append(["WSSS / FSSS ratio (seg@pseudo ÷ seg@GT)", "`summary.json`",
                 str(figures["seg_pseudo_miou"]["split"]), "", "—" if ratio is None else f"{ratio:.3f}", "",
                 "not scored: no GT" if ratio is None else ""])
    parts.append(markdown_table(["stage", "file", "split", "images", "mIoU", "threshold chosen with GT", "notes"],
                                rows))
    parts.append(chain_paragraph(figures))
    if chain_seeds is not None or machine_runs is not None:
        parts.append("## Headline over seeds")
        parts += [ablation_section(path) for path in (chain_seeds, machine_runs) if path is not None]

    per_class_figures = [figure for figure in FIGURES if isinstance(figures[figure.key].get("per_class"), dict)]
    if per_class_figures:
        class_names: list[str] = []
        for figure in per_class_figures:
            class_names += [name for name in figures[figure.key]["per_class"] if name not in class_names]
        parts.append("## Per-class IoU")
        parts.append(markdown_table(
            ["class"] + [f"{figure.stem} ({figures[figure.key]['split']})" for figure in per_class_figures],
            [[name] + [percent(figures[figure.key]["per_class"].get(name)) for figure in per_class_figures]
             for name in class_names]))

    if clip is not None:
        parts.append(clip_section(*clip))

    cam = figures["cam_miou"]
    if isinstance(cam.get("variants"), dict) and cam["variants"]:
        parts.append("## CAM variant ablation")
        parts.append(f"`metrics/cam.json` → `variants`; split {cam['split']}; each variant's background "
                     "threshold is chosen with GT (the whole curve is swept). The chain uses "
                     f"**{cam.get('variant', '?')}**.")
        parts.append(markdown_table(["variant", "mIoU", "best threshold", "threshold chosen with GT"],
                                    [[name, percent(values.get("miou")), str(values.get("best_threshold", "—")),
                                      yes_no(gt_flag(cam))] for name, values in cam["variants"].items()]))
    if ablation_files:
        parts.append("## Other ablations")
        parts += [ablation_section(path) for path in ablation_files]
    if other_runs:
        parts.append("## Bench tables of other datasets")
        parts.append("Left out here (this run's dataset is **" + dataset_name + "**): " + "; ".join(
            f"`metrics/{path.name}` (made on the {made_on} dataset)" for path, made_on in other_runs.items())
            + ". Re-run `python -m bench.ablations` / `bench.chain_seeds` / `bench.machine_runs` on this data to "
              "fill them.")
    return "\n\n".join(parts) + "\n"


BENCH_DATASET_DEFAULT = "synthetic"
"""The dataset of a bench table (ablations, chain seeds, machine runs) without a ``dataset`` key: the tables
written before the key existed were all made on the built-in synthetic benchmark."""


def bench_files_of(dataset_name: str, paths: list[Path]) -> tuple[list[Path], dict[Path, str]]:
    """The bench tables made on ``dataset_name`` (rendered), and the others with their dataset (left out, each
    named in RESULTS.md: a table of another dataset's runs must not sit under this run's headline)."""
    this_run, other_runs = [], {}
    for path in paths:
        made_on = read_metrics(path).get("dataset", BENCH_DATASET_DEFAULT)
        if made_on == dataset_name:
            this_run.append(path)
        else:
            other_runs[path] = str(made_on)
    return this_run, other_runs


def write_summary(params: Params, paths: SummaryPaths = SummaryPaths()) -> dict[str, float | None]:
    """Check every metrics file, then write ``summary.json`` and ``RESULTS.md``; returns the summary."""
    splits = {"train": params.dataset.scored_split, "val": params.dataset.val_split}  # train figures: the scored split
    figures = load_figures(paths, splits)
    summary = summary_of(figures)
    chain_seeds, machine_runs = paths.metrics_root / "chain_seeds.json", paths.metrics_root / "machine_runs.json"
    bench_files = [*sorted(paths.metrics_root.glob("ablations*.json")), chain_seeds, machine_runs]
    this_run, other_runs = bench_files_of(params.dataset.name, [path for path in bench_files if path.is_file()])
    ablation_files = [path for path in this_run if path.name.startswith("ablations")]
    clip_path = paths.metrics_root / "clip.json"
    clip = (read_metrics(clip_path), clip_path) if clip_path.is_file() else None
    markdown = results_markdown(figures, summary, params.dataset.name, ablation_files, clip,
                                chain_seeds if chain_seeds in this_run else None,
                                machine_runs if machine_runs in this_run else None, other_runs)
    write_json(paths.summary, summary)
    write_text(paths.results, markdown)
    return summary


def summary_line(params: Params, args: argparse.Namespace, context: None) -> str:
    summary = write_summary(params)
    # A figure not scored says why in its own metrics file ("not scored: no CAMs (cam.source: none)", "... no GT");
    # the ratio is not scored when either segmenter figure is not.
    reasons = {figure.key: str(read_metrics(SummaryPaths().metrics_root / f"{figure.stem}.json")["not_scored"])
               for figure in FIGURES if summary.get(figure.key) is None}
    return "summary: " + ", ".join(
        f"{key} {reasons.get(key, 'not scored: a segmenter figure is not') if value is None else f'{value:.4f}'}"
        for key, value in summary.items())


SPEC = StageSpec(name="summary", module="pipeline.summary", description=__doc__.splitlines()[0], run=summary_line)


def main(argv: list[str] | None = None) -> int | None:
    return run_stage(SPEC, argv)

if __name__ == "__main__":
    run_stage_cli(main, "summary", (SummaryError,))

"""``make report``: one self-contained, offline HTML page of the chain's results (``reports/index.html``).

Everything the page shows is inlined: plots are drawn with matplotlib to PNG
and embedded as base64 ``data:`` URIs, styles sit in one ``<style>`` element,
and there is no script, font or stylesheet from the network. The page opens
from a USB stick on a machine with no internet.

Sections, each drawn from whatever exists (a missing or unreadable input gets
one clear line naming the file, never a crash):

- the headline (``metrics/summary.json``) and the stage-by-stage mIoU table
  (``metrics/<stage>.json``), with the paper's number beside ours for VOC/COCO;
- per-class IoU of every stage that reports it;
- the CAM background-threshold curve (``plots/cam_threshold.csv``);
- training curves (``dvclive/<stage>/plots/metrics/**/*.tsv``);
- overlays for a fixed sample (``weakclip_core.evaluation.overlays.evenly_spaced``) of
  train images (image, GT, CAM seeds from the store, WeakCLIP prediction, pseudo
  mask, retrained predictions) and of val images (image, GT, predictions). The
  predictions come from running the trained models (``artifacts/weakclip``,
  ``artifacts/seg/<source>``) single-scale on those few images.

Modules: ``inputs`` (where the report looks, readers), ``markup`` (HTML pieces, style), ``figures``
(plots and mask tiles as PNG), ``sections`` (metrics sections), ``overlay_grid`` (the overlays section);
this module assembles the page and holds the command line (``python -m pipeline.report``).
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from pipeline.report.inputs import ReportInputs
from pipeline.report.markup import STYLE, escape
from pipeline.report.overlay_grid import section_overlays
from pipeline.report.sections import (section_cam_curve, section_extra_images, section_headline,
                                      section_per_class, section_stages, section_training)
from weakclip_core.artifacts.atomic import atomic_path
from weakclip_core.config import load_params


def build_report(inputs: ReportInputs, show_progress: bool = False) -> str:
    """The whole page as one HTML string (no external reference of any kind). ``show_progress``: a bar over the
    sections (the overlays run the trained models: minutes with ViT-B/16 and ResNet-101 on a CPU)."""
    stages_html, read = section_stages(inputs)
    generated = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections: list[tuple[str, Callable[[], str]]] = [
        ("headline", lambda: section_headline(inputs)), ("per-class IoU", lambda: section_per_class(read)),
        ("CAM threshold curve", lambda: section_cam_curve(inputs)), ("training curves", lambda: section_training(inputs)),
        ("overlays (runs the trained models)", lambda: section_overlays(inputs)),
        ("other images", lambda: section_extra_images(inputs)),
    ]
    drawn: dict[str, str] = {}
    with tqdm(sections, desc="report", unit="section", disable=not show_progress) as bar:
        for name, draw in bar:
            bar.set_postfix_str(name)
            drawn[name] = draw()
    body = [
        f"<h1>weakclip-pipeline report — {escape(inputs.dataset_name)}</h1>",
        f"<p class=note>Generated {generated} from {escape(inputs.root)}.</p>",
        drawn["headline"], stages_html, *(drawn[name] for name, _ in sections[1:]),
    ]
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
            f"<title>weakclip-pipeline report — {escape(inputs.dataset_name)}</title>"
            f"<style>{STYLE}</style></head><body>" + "".join(body) + "</body></html>\n")


def write_report(inputs: ReportInputs, output: Path, show_progress: bool = False) -> Path:
    """Build and write the page atomically; returns ``output``."""
    page = build_report(inputs, show_progress)
    with atomic_path(output, suffix=".html") as temporary:
        temporary.write_text(page, encoding="utf-8")
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report", description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--root", type=Path, default=Path("."), help="project folder holding metrics/, plots/, ...")
    parser.add_argument("--output", type=Path, default=Path("reports/index.html"))
    parser.add_argument("--samples", type=int, default=6, help="images per split in the overlay grid")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    params_path = args.params if args.params.is_absolute() else root / args.params
    inputs = ReportInputs.from_params(load_params(params_path), root, n_samples=args.samples)
    output = args.output if args.output.is_absolute() else root / args.output
    write_report(inputs, output, show_progress=not args.no_progress)
    print(f"report: {output} ({output.stat().st_size / 1024:.0f} KiB)")
    return 0

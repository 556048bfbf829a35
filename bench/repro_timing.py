"""Run ``dvc repro`` and time each stage from DVC's own output; what ``make repro`` calls.

Why: issue #7 asks for the per-stage wall time of ``make repro`` on the 2-core
CPU, in the README, measured rather than typed. DVC prints ``Running stage
'<name>':`` when a stage starts; the time between two such lines (or the end
of the run) is that stage's wall time. The result goes to
``bench/repro_timing.json`` and, between the markers
``<!-- repro-timing:start -->`` / ``<!-- repro-timing:end -->``, into
README.md. Only a run in which every stage of ``dvc.yaml`` ran is recorded: a
partial run (a changed param re-runs part of the chain) or one where everything
was up to date leaves both files as they were, and so does a run on another dataset than the synthetic
default (its table is printed instead).

Usage: ``python -m bench.repro_timing [dvc repro arguments...]``.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flows.dvc_cli import dvc_command
from weakclip_core.artifacts.atomic import write_json, write_text
from weakclip_core.config import load_params

REPO = Path(__file__).resolve().parents[1]
TIMING_FILE = REPO / "bench" / "repro_timing.json"
README = REPO / "README.md"
START_MARKER = "<!-- repro-timing:start -->"
END_MARKER = "<!-- repro-timing:end -->"
RUNNING_STAGE = re.compile(r"^Running stage '([^']+)'")


def stage_durations(events: list[tuple[float, str]], finished_at: float) -> dict[str, float]:
    """``{stage: seconds}`` from (time, stage) start events in order; each stage ends where the next begins."""
    durations: dict[str, float] = {}
    for (started, stage), following in zip(events, [*events[1:], (finished_at, "")]):
        durations[stage] = round(following[0] - started, 1)
    return durations


def all_stage_names(root: Path) -> set[str]:
    """Every stage of the project's pipeline as DVC names it (``foreach`` expanded: ``seg_train@gt``)."""
    from dvc.repo import Repo  # noqa: PLC0415 (DVC's import is slow; only needed after a run)

    with Repo(str(root)) as repo:
        return {stage.addressing for stage in repo.index.stages}


def markdown_table(record: dict[str, Any]) -> str:
    """The README block: the command that was timed, one row per stage that ran, then the total."""
    command = record.get("command", "dvc repro").strip()
    timed = "`make repro`" if command == "dvc repro" else f"`make repro`'s script run as `{command}`"
    lines = [f"Measured by {timed} on {record['measured_on']} ({record['machine']}); "
             f"all {len(record['stages'])} stages ran.",
             "", "| stage | wall time |", "|---|---|"]
    lines += [f"| `{stage}` | {seconds / 60:.1f} min ({seconds:.0f} s) |" for stage, seconds in record["stages"].items()]
    lines.append(f"| **total `dvc repro`** | **{record['total_s'] / 60:.1f} min ({record['total_s']:.0f} s)** |")
    return "\n".join(lines)


def update_readme(readme: Path, block: str) -> bool:
    """Replace the text between the markers; False (and nothing written) when the markers are missing."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        return False
    write_text(readme, text[:start + len(START_MARKER)] + "\n" + block + "\n" + text[end:])
    return True


def main(argv: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = dvc_command("repro", *arguments)
    started = time.monotonic()
    events: list[tuple[float, str]] = []
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as process:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            match = RUNNING_STAGE.match(line.strip())
            if match:
                events.append((time.monotonic(), match.group(1)))
        code = process.wait()
    finished = time.monotonic()
    if code != 0 or not events:
        return code
    missing = all_stage_names(REPO) - {stage for _, stage in events}
    if missing:
        print(f"repro_timing: a partial run ({len(events)} stages ran; not {', '.join(sorted(missing))}): "
              f"the README's full-chain timing is left as it was")
        return 0
    record = {
        "measured_on": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{os.cpu_count()} CPU cores, {platform.machine()}, OMP_NUM_THREADS="
                   f"{os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "command": "dvc repro " + " ".join(arguments),
        "stages": stage_durations(events, finished),
        "total_s": round(finished - started, 1),
    }
    record_run(record, load_params(REPO / "params.yaml").dataset.name, TIMING_FILE, README)
    return 0


def record_run(record: dict[str, Any], dataset_name: str, timing_file: Path, readme: Path) -> bool:
    """Keep a full run's timing in ``timing_file`` and the README block, for the synthetic chain only.

    The README's table describes ``make repro`` on the built-in synthetic dataset; a VOC or COCO run (same
    command, other params) prints its table instead of overwriting that record. Returns whether it wrote.
    """
    table = markdown_table(record)
    if dataset_name != "synthetic":
        print(f"repro_timing: dataset {dataset_name!r}, not the synthetic default: {timing_file.name} and "
              f"{readme.name} are left as they are. This run's stage times:\n{table}")
        return False
    write_json(timing_file, record)
    if update_readme(readme, table):
        print(f"repro_timing: {len(record['stages'])} stages, {record['total_s']:.0f} s -> {timing_file.name}, "
              f"{readme.name}")
    return True


if __name__ == "__main__":
    raise SystemExit(main())

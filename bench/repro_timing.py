"""Run ``dvc repro`` and time each stage from DVC's own output; what ``make repro`` calls.

Why: issue #7 asks for the per-stage wall time of ``make repro`` on the 2-core CPU, in the README, measured
rather than typed. DVC prints ``Running stage '<name>':`` when a stage starts; the time between two such
lines (or the end of the run) is that stage's wall time.

``make repro`` changes no tracked file of its own (issue #19 item 7): it prints the table and, when every
stage of ``dvc.yaml`` ran, keeps the run's record in ``timings/repro_<dataset>.json`` (git-ignored, beside
the stages' own ``timings/<stage>.json``). A partial run (a changed param re-runs part of the chain) or one
where everything was up to date prints what ran and keeps the last full record.

``make timing-table`` (``python -m bench.repro_timing --write-readme``) is the explicit step that publishes
the last full run on the synthetic default: it adds ``timings/repro_synthetic.json`` to
``bench/repro_timing.json`` (one record per machine kind: a run replaces the record of its own kind and keeps
the others) and writes their table into README.md between ``<!-- repro-timing:start -->`` and
``<!-- repro-timing:end -->``, one column per kind. Each record names the CPU (model name, family and model
numbers): the chain's time follows the CPU kind, and so do its bytes (another CPU's float kernels round
differently), so a time without the kind says little. A VOC or COCO run is recorded under its own name and
never published there.

Usage: ``python -m bench.repro_timing [dvc repro arguments...]`` or ``python -m bench.repro_timing --write-readme``.
"""

from __future__ import annotations

import json
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
TIMINGS_DIR = REPO / "timings"  # git-ignored; the stages write timings/<stage>.json there too
TIMING_FILE = REPO / "bench" / "repro_timing.json"  # committed; written only by --write-readme
README = REPO / "README.md"
PUBLISHED_DATASET = "synthetic"
START_MARKER = "<!-- repro-timing:start -->"
END_MARKER = "<!-- repro-timing:end -->"
RUNNING_STAGE = re.compile(r"^Running stage '([^']+)'")
WRITE_README = "--write-readme"
CPUINFO = Path("/proc/cpuinfo")


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The first processor as Linux names it, with its family and model numbers (``Intel(R) Xeon(R) Processor,
    family 6 model 167``): under a hypervisor the name alone can be generic, the numbers tell kinds apart.
    Without ``/proc/cpuinfo``: ``platform.processor()``, else ``unknown CPU``."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block only
            continue
        key, separator, value = line.partition(":")
        if separator:
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or "unknown CPU"
    if fields.get("cpu family") and fields.get("model"):
        return f"{name}, family {fields['cpu family']} model {fields['model']}"
    return name


def machine_description() -> str:
    """What a timing record says it was measured on: cores, CPU kind, architecture, OpenMP threads."""
    return (f"{os.cpu_count()} CPU cores, {cpu_model()} ({platform.machine()}), "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def record_file(timings_dir: Path, dataset_name: str) -> Path:
    """Where ``make repro`` keeps the last full run on ``dataset_name``: ``timings/repro_<dataset>.json``."""
    return timings_dir / f"repro_{dataset_name}.json"


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
    lines += [f"| `{stage}` | {minutes_and_seconds(seconds)} |" for stage, seconds in record["stages"].items()]
    lines.append(f"| **total `dvc repro`** | **{minutes_and_seconds(record['total_s'])}** |")
    return "\n".join(lines)


def minutes_and_seconds(seconds: float) -> str:
    return f"{seconds / 60:.1f} min ({seconds:.0f} s)"


def published_records(timing_file: Path) -> list[dict[str, Any]]:
    """The records of ``bench/repro_timing.json``, newest first; none when the file is absent."""
    if not timing_file.is_file():
        return []
    return records_in(json.loads(timing_file.read_text(encoding="utf-8")), timing_file)


def records_in(data: Any, source: Path) -> list[dict[str, Any]]:
    """The ``records`` list of a published timing file's contents (read from ``source``)."""
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise ValueError(f"{source}: not a published timing file (no 'records' list)")
    return list(data["records"])


UNRECORDED_MODEL = " (model not recorded)"
"""Marks a record made before records named the CPU's model: ``2 CPU cores, AMD EPYC (model not recorded) ...``."""


def same_kind(recorded: str, machine: str) -> bool:
    """Whether a published record's machine is ``machine``'s kind: the same description; for a record marked
    ``UNRECORDED_MODEL``, any description that starts as it does before the mark (its cores and CPU line)."""
    if recorded == machine:
        return True
    prefix, marked, _ = recorded.partition(UNRECORDED_MODEL)
    return bool(marked) and machine.startswith(prefix)


def with_record(records: list[dict[str, Any]], record: dict[str, Any]) -> list[dict[str, Any]]:
    """``record`` first, then the other machines' records: a run replaces the one of its own machine kind."""
    return [record, *(kept for kept in records if not same_kind(str(kept.get("machine")), str(record.get("machine"))))]


def stand_in_record(path: Path, machine: str) -> dict[str, Any] | None:
    """The ``make repro`` record in ``path`` that may stand in for a stage's time on ``machine``: a machine's own
    ``timings/repro_<dataset>.json`` is one record; the published file holds one per kind, and ``machine``'s own
    kind's is taken, else the newest. ``None`` when the file is absent or holds no record."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "records" not in data:
        return data if isinstance(data, dict) else None
    records = records_in(data, path)
    return next((record for record in records if same_kind(str(record.get("machine")), machine)),
                records[0] if records else None)


def published_table(records: list[dict[str, Any]]) -> str:
    """The README block: one column per machine kind (newest first), one row per stage, then the totals."""
    stages = list(dict.fromkeys(stage for record in records for stage in record["stages"]))
    lines = ["Measured by `make repro` (every stage of the chain ran), one column per machine kind: the chain's "
             "time follows the CPU, and so do its figures (docs/RESULTS.md, \"The committed chain on other "
             "machines\").", ""]
    labels = [chr(ord("A") + index) if index < 26 else f"#{index + 1}" for index in range(len(records))]
    for label, record in zip(labels, records):
        command = record.get("command", "dvc repro").strip()
        how = "" if command == "dvc repro" else f", `make repro`'s script run as `{command}`"
        lines.append(f"- {label}: {record['machine']}, {record['measured_on']}{how}")
    lines += ["", "| stage | " + " | ".join(labels) + " |", "|---|" + "---|" * len(records)]
    for stage in stages:
        cells = [minutes_and_seconds(record["stages"][stage]) if stage in record["stages"] else "-"
                 for record in records]
        lines.append(f"| `{stage}` | " + " | ".join(cells) + " |")
    lines.append("| **total `dvc repro`** | "
                 + " | ".join(f"**{minutes_and_seconds(record['total_s'])}**" for record in records) + " |")
    return "\n".join(lines)


def update_readme(readme: Path, block: str) -> bool:
    """Replace the text between the markers; False (and nothing written) when the markers are missing."""
    text = readme.read_text(encoding="utf-8")
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start < 0 or end < start:
        return False
    write_text(readme, text[:start + len(START_MARKER)] + "\n" + block + "\n" + text[end:])
    return True


def record_run(record: dict[str, Any], missing: set[str], timings_dir: Path) -> Path | None:
    """Print the run's table; keep a full run's record in ``timings/repro_<dataset>.json``.

    Writes nothing that git tracks. Returns the record's path, or ``None`` for a partial run (its table is
    printed, the last full record stays).
    """
    table = markdown_table(record)
    if missing:
        print(f"repro_timing: a partial run ({len(record['stages'])} stages ran; not {', '.join(sorted(missing))}); "
              f"the last full-chain record is kept. This run's stage times:\n{table}")
        return None
    path = record_file(timings_dir, record["dataset"])
    write_json(path, record)
    print(f"repro_timing: {len(record['stages'])} stages, {record['total_s']:.0f} s -> "
          f"{path.relative_to(timings_dir.parent) if path.is_relative_to(timings_dir.parent) else path}\n{table}")
    if record["dataset"] == PUBLISHED_DATASET:
        print("repro_timing: `make timing-table` copies this record into README.md and bench/repro_timing.json")
    return path


def write_readme(timings_dir: Path, timing_file: Path, readme: Path) -> int:
    """``make timing-table``: publish the last full synthetic run beside the other machine kinds' records (it
    replaces its own kind's); 1 with a message when there is none."""
    source = record_file(timings_dir, PUBLISHED_DATASET)
    if not source.is_file():
        print(f"repro_timing: no full-chain record in {source}: run `make repro` (every stage must run, e.g. "
              f"`.venv/bin/python -m bench.repro_timing -f`) on the {PUBLISHED_DATASET} default first",
              file=sys.stderr)
        return 1
    record = json.loads(source.read_text(encoding="utf-8"))
    records = with_record(published_records(timing_file), record)
    if not update_readme(readme, published_table(records)):
        print(f"repro_timing: {readme} has no {START_MARKER} ... {END_MARKER} block; nothing written",
              file=sys.stderr)
        return 1
    write_json(timing_file, {"records": records})
    print(f"repro_timing: the run of {record['measured_on']} ({record['total_s']:.0f} s) on {record['machine']} "
          f"beside {len(records) - 1} other machine kind(s) -> {readme.name}, "
          f"{timing_file.relative_to(REPO) if timing_file.is_relative_to(REPO) else timing_file}")
    return 0


def main(argv: list[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments == [WRITE_README]:
        return write_readme(TIMINGS_DIR, TIMING_FILE, README)
    if WRITE_README in arguments:
        print(f"repro_timing: {WRITE_README} takes no other argument (it runs nothing)", file=sys.stderr)
        return 2
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
    record = {
        "measured_on": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": machine_description(),
        "command": "dvc repro " + " ".join(arguments),
        "dataset": load_params(REPO / "params.yaml").dataset.name,
        "stages": stage_durations(events, finished),
        "total_s": round(finished - started, 1),
    }
    record_run(record, all_stage_names(REPO) - set(record["stages"]), TIMINGS_DIR)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The committed run is one run: every output git holds matches the hash ``dvc.lock`` records for it, and every
stage's record of a file another stage wrote matches that stage's output.

Why: the metrics, dvclive logs and ``docs/RESULTS.md`` are committed to git (``cache: false``) while ``dvc.lock``
records their hashes. Committing one without the other (a ``dvc.lock`` pulled from a run on another machine
beside the committed metrics, or a hand-edited RESULTS) leaves a project whose ``dvc status`` calls its own
results modified and whose figures no lock vouches for. The hashes here are computed independently of DVC:
md5 of a file's bytes, and for a directory the md5 of the JSON list ``[{"md5", "relpath"}, ...]`` sorted by
path, the ``.dir`` hash DVC 3 records.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def git_tracked_files() -> set[str]:
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    return set(listed.stdout.splitlines())


def file_md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def directory_md5(root: Path, relpaths: list[str]) -> str:
    entries = [{"md5": file_md5(root / relpath), "relpath": relpath} for relpath in sorted(relpaths)]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def lock_stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.lock").read_text(encoding="utf-8"))["stages"]


def test_directory_hash_matches_a_hand_built_listing(tmp_path: Path) -> None:
    # Two files; the listing DVC hashes is sorted by relpath and serialised with sorted keys.
    (tmp_path / "b.txt").write_bytes(b"second\n")
    (tmp_path / "a.txt").write_bytes(b"first\n")
    listing = ('[{"md5": "' + hashlib.md5(b"first\n").hexdigest() + '", "relpath": "a.txt"}, '
               '{"md5": "' + hashlib.md5(b"second\n").hexdigest() + '", "relpath": "b.txt"}]')
    assert directory_md5(tmp_path, ["b.txt", "a.txt"]) == hashlib.md5(listing.encode()).hexdigest() + ".dir"


def test_every_output_git_holds_matches_dvc_lock() -> None:
    tracked = git_tracked_files()
    checked, mismatched = [], []
    for stage, entry in lock_stages().items():
        for out in entry.get("outs", []):
            path, recorded = out["path"], out["md5"]
            if path in tracked:
                actual = file_md5(REPO / path)
            else:
                inside = [name[len(path) + 1:] for name in tracked if name.startswith(path + "/")]
                if not inside:
                    continue  # a DVC-cached output: git holds none of it
                assert len(inside) == out.get("nfiles"), (
                    f"dvc.lock stage {stage}: {path} records {out.get('nfiles')} files, git holds {len(inside)}")
                actual = directory_md5(REPO / path, inside)
            checked.append(path)
            if actual != recorded:
                mismatched.append(f"stage {stage}: {path} is {actual} in git, {recorded} in dvc.lock")
    # The metrics, the dvclive logs and RESULTS are committed; a lock that checks none of them checks nothing.
    assert {"metrics/summary.json", "metrics/cam.json", "docs/RESULTS.md"} <= set(checked)
    assert not mismatched, ("the committed outputs and dvc.lock are from different runs (re-run the stage, or "
                            "commit its outputs with its lock entry):\n  " + "\n  ".join(mismatched))


def test_every_stage_read_the_outputs_the_lock_records() -> None:
    stages = lock_stages()
    written = {out["path"]: (stage, out["md5"]) for stage, entry in stages.items() for out in entry.get("outs", [])}
    assert len(written) > 20
    stale = [f"stage {stage} read {dep['path']} as {dep['md5']}, stage {written[dep['path']][0]} wrote "
             f"{written[dep['path']][1]}"
             for stage, entry in stages.items() for dep in entry.get("deps", [])
             if dep["path"] in written and dep["md5"] != written[dep["path"]][1]]
    assert not stale, "dvc.lock mixes runs:\n  " + "\n  ".join(stale)

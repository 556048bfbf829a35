"""One-line error reports for the stage entry points.

A bad input (a params key, a dataset file, a CAM store, a weights file) is the
user's to fix, so a stage run from the command line prints one line naming the
file or key and exits 1, instead of a traceback whose last line says it. Any
other exception is a bug and keeps its traceback. ``WEAKCLIP_TRACEBACK=1``
shows the traceback for input errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from weakclip_core.artifacts.cam_store import CamStoreError
from weakclip_core.models.clip import ClipWeightsError
from weakclip_core.config.schema import ConfigError
from weakclip_core.data.layout import DatasetError
from weakclip_core.data.segmentation import GroundTruthMaskError
from weakclip_core.models.mctformer import PretrainedWeightsError
from weakclip_core.models.segmenter import SegmenterWeightsError

class MissingInputError(FileNotFoundError):
    """An upstream artifact a stage reads does not exist; the message names it and the stage that makes it."""


def require_input(path: str | Path, made_by_stage: str) -> Path:
    """``path`` as a ``Path`` when it exists; else ``MissingInputError``: ``<path> does not exist: run
    `dvc repro <made_by_stage>` first``. Stages call it where they open an upstream artifact, so a chain
    run out of order says what to run instead of Python's bare ``No such file or directory``."""
    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path} does not exist: run `dvc repro {made_by_stage}` first")
    return path


INPUT_ERRORS: tuple[type[BaseException], ...] = (
    CamStoreError, ClipWeightsError, ConfigError, DatasetError, GroundTruthMaskError, PretrainedWeightsError,
    SegmenterWeightsError, FileNotFoundError, OSError,
)


def _close_progress_bars() -> None:
    """Finish the progress bars the failed stage left open, so the error starts its own line."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def run_stage_cli(main: Callable[[], object], stage: str,
                  extra_errors: tuple[type[BaseException], ...] = ()) -> None:
    """Run ``main()``; input errors become ``<stage>: error: <message>`` on stderr and exit status 1."""
    try:
        result = main()
    except INPUT_ERRORS + extra_errors as error:
        if os.environ.get("WEAKCLIP_TRACEBACK"):
            raise
        _close_progress_bars()
        print(f"{stage}: error: {error}", file=sys.stderr)
        for note in getattr(error, "__notes__", []):
            print(f"  {note}", file=sys.stderr)
        raise SystemExit(1) from None
    raise SystemExit(result if isinstance(result, int) else 0)

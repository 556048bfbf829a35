"""The whole ``params.yaml``: one typed section per stage, one loader used by every stage."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from weakclip_core.config.cam import CamConfig
from weakclip_core.config.clip import ClipConfig
from weakclip_core.config.dataset import DatasetConfig
from weakclip_core.config.pseudo import PseudoConfig
from weakclip_core.config.schema import ConfigError, bounded, build_dataclass, to_plain
from weakclip_core.config.seg import SegConfig
from weakclip_core.config.weakclip import WeakClipConfig


Precision = Literal["fp32", "bf16"]
"""``runtime.precision``'s values: validated here, and the one list ``runtime.device.autocast`` checks against."""


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how stages compute. ``device: auto`` picks CUDA when present, else CPU.

    ``launcher: torchrun`` runs the training stages as ``nproc`` DDP processes
    (nccl on GPU, gloo on CPU). ``precision: bf16`` runs WeakCLIP's training forward and losses
    (``weakclip_train``) and its inference (``weakclip_train``'s evaluation, ``pseudo_masks``) under
    ``torch.autocast`` with bfloat16; ``fp32`` (default) runs without any autocast context, the code path as
    it was before the key existed. The other stages always run fp32.
    """

    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = bounded(0, low=0)
    threads: int = bounded(0, low=0)
    launcher: Literal["none", "torchrun"] = "none"
    nproc: int = bounded(1, low=1)
    precision: Precision = "fp32"


@dataclass(frozen=True)
class Params:
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    cam: CamConfig = field(default_factory=CamConfig)
    weakclip: WeakClipConfig = field(default_factory=WeakClipConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    seg: SegConfig = field(default_factory=SegConfig)

    def validate(self) -> None:
        """What WeakCLIP asks of the CLIP that ``clip.arch`` builds (``source`` pretrain or random; a weights file
        brings its own architecture): its taps inside the visual tower, its prompts inside the text context.
        Checked here, so a wrong pair stops ``load_params`` naming both keys, not ``weakclip_train``'s first step
        after the clip and CAM stages have run."""
        if self.clip.source == "file":
            return
        arch, weakclip = self.clip.arch, self.weakclip
        if max(weakclip.taps) >= arch.vision_layers:
            raise ConfigError(f"weakclip.taps: {weakclip.taps} reach block {max(weakclip.taps)}, but clip.arch."
                              f"vision_layers is {arch.vision_layers} (blocks 0-{arch.vision_layers - 1}); lower the "
                              "taps or add layers")
        if weakclip.text_context_length > arch.context_length:
            raise ConfigError(f"weakclip.text_context_length: {weakclip.text_context_length} tokens exceed "
                              f"clip.arch.context_length {arch.context_length}, the text encoder's positions")


def params_from_dict(data: dict[str, Any] | None) -> Params:
    """Validate a parsed params mapping; errors name the key path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"params: expected a mapping at the top level, got {type(data).__name__}")
    return build_dataclass(Params, data)


def distributed_batch_sizes(params: Params) -> dict[str, int]:
    """``{params key: global batch}`` of every training stage that ``runtime.launcher: torchrun`` runs as
    ``runtime.nproc`` DDP processes, each taking an equal slice of the batch: the union of the stages' own
    ``global_batches`` (``pipeline/<stage>.py``'s ``StageSpec``; tests/test_presets.py checks they agree)."""
    batches = {"cam.train.batch_size": params.cam.train.batch_size,
               "weakclip.train.batch_size": params.weakclip.train.batch_size,
               "seg.train.batch_size": params.seg.train.batch_size}
    if params.clip.source == "pretrain":
        batches["clip.pretrain.batch_size"] = params.clip.pretrain.batch_size
    return batches


def check_batches_divide(runtime: RuntimeConfig, batches: Mapping[str, int]) -> None:
    """Under ``launcher: torchrun`` each global batch (``{params key: size}``) must divide over ``runtime.nproc``
    DDP processes: a ``ConfigError`` naming the first key that does not, one line instead of ``nproc`` failing
    workers. A training stage checks its own batches before it starts torchrun (``pipeline/_stage.py``)."""
    if runtime.launcher != "torchrun":
        return
    for key, size in batches.items():
        if size % runtime.nproc:
            raise ConfigError(f"{key}: the global batch {size} does not divide over runtime.nproc = {runtime.nproc} "
                              f"DDP processes; make {key} a multiple of {runtime.nproc} or change runtime.nproc")


def check_distributed_batches(params: Params) -> None:
    """Every training batch at once (``check_batches_divide``), so a preset cannot hold a batch that would stop
    the chain only at its last stage."""
    check_batches_divide(params.runtime, distributed_batch_sizes(params))


def parse_params_text(text: str, source: str | Path) -> Any:
    """A params file's YAML read as DVC reads it, YAML 1.2 (ruamel.yaml). PyYAML's YAML 1.1 reads ``3e-05``, what
    ``dvc exp run -S key=0.00003`` writes, as a string (1.1 wants a dot before the exponent), so a value DVC had
    set was refused as not a float; and it lets a key given twice silently take its last value, which DVC
    refuses. Bad YAML or a key given twice: a ``ConfigError`` naming ``source`` and the lines."""
    try:
        return YAML(typ="safe").load(text)
    except YAMLError as error:  # its lines say "in <unicode string>, line N": the text is source's
        reason = str(error).split("\n\nTo suppress this check", 1)[0].strip()  # drop ruamel's link to its docs
        reason = " ".join(line.strip() for line in reason.replace('"<unicode string>"', "the file").splitlines())
        raise ConfigError(f"{source}: not valid YAML: {reason}") from None


def defaulted_keys(data: Any, params: Params) -> list[tuple[str, Any]]:
    """``(key path, value used)`` for every key of the schema that ``data`` (a parsed params file) does not set,
    a whole missing section as one entry. The schema's defaults are not ``params.yaml``'s (``cam.arch.depth`` 6
    against the synthetic default's 3), so a key deleted from ``params.yaml`` silently changed what a stage ran."""
    defaulted: list[tuple[str, Any]] = []

    def walk(given: Any, used: Any, prefix: str) -> None:
        for key, value in used.items():
            if not isinstance(given, dict) or key not in given:
                defaulted.append((prefix + key, value))
            elif isinstance(value, dict):
                walk(given[key], value, f"{prefix}{key}.")

    walk(data if data is not None else {}, to_plain(params), "")
    return defaulted


def defaulted_keys_note(path: str | Path, defaulted: list[tuple[str, Any]], shown: int = 6) -> str:
    """One line naming the keys ``path`` leaves to the built-in defaults and the values they took."""
    def show(value: Any) -> str:
        return "{...} (the whole section)" if isinstance(value, dict) else repr(value)

    listed = ", ".join(f"{key} = {show(value)}" for key, value in defaulted[:shown])
    more = f" and {len(defaulted) - shown} more" if len(defaulted) > shown else ""
    return (f"note: {path} does not set {len(defaulted)} key(s), so the built-in default is used: "
            f"{listed}{more}. Write the key into {path} to choose its value")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``; a missing file or bad YAML names the file. A key the file leaves out
    takes the schema's default, and one line on stderr names it and the value used; another says when
    ``runtime.nproc`` goes unused."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    data = parse_params_text(path.read_text(encoding="utf-8"), path)
    try:
        params = params_from_dict(data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    if "LOCAL_RANK" in os.environ:  # a torchrun worker: its launcher has said what follows
        return params
    defaulted = defaulted_keys(data, params)
    if defaulted:
        print(defaulted_keys_note(path, defaulted), file=sys.stderr)
    if params.runtime.launcher == "none" and params.runtime.nproc > 1:
        print(f"note: {path}: runtime.nproc is {params.runtime.nproc} but runtime.launcher is none, so every stage "
              "runs in one process; set runtime.launcher: torchrun for DDP", file=sys.stderr)
    return params

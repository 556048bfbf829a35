"""Apply a paper preset (``configs/voc.yaml``, ``configs/coco.yaml``) over ``params.yaml``.

A preset is a partial ``params.yaml``: only the keys it names change. The merge
is a deep merge of mappings (a preset section updates the same section of the
params; a list or a scalar in the preset replaces the params' value whole).
The merged tree is validated by the one typed schema (``params_from_dict``), and
its training batches against ``runtime.nproc`` (``check_distributed_batches``),
*before* anything is written, so a typo in a preset (``weakclip.promt_len``)
or an out-of-range value stops with the key path and ``params.yaml`` is left
as it was. The result is written atomically.

The round trip uses ruamel.yaml (DVC's own YAML library), so the comments of
``params.yaml`` and of the preset survive the merge: the file stays readable.

CLI::

    python -m weakclip_core.config.presets apply configs/voc.yaml [--params params.yaml]
    python -m weakclip_core.config.presets check configs/coco.yaml [--params params.yaml]
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from weakclip_core.artifacts.atomic import atomic_path
from weakclip_core.config.params import Params, check_distributed_batches, params_from_dict
from weakclip_core.config.schema import ConfigError


def _round_trip_yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 120
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def read_yaml_mapping(path: str | Path) -> CommentedMap:
    """A YAML file whose top level is a mapping (comments kept); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = _round_trip_yaml().load(path.read_text())
    except Exception as error:  # noqa: BLE001 — any parser error means "not valid YAML"
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if data is None:
        return CommentedMap()
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: Any, override: Any, path: str = "") -> Any:
    """Merge ``override`` into ``base`` in place and return it.

    Mappings merge key by key, recursively; any other value of ``override``
    (scalar, list) replaces the base value. A mapping in the preset where the
    params hold a scalar (or the reverse) is an error naming the key path:
    it is always a typo in the preset.
    """
    if not isinstance(override, Mapping):
        return override
    if not isinstance(base, Mapping):
        raise ConfigError(f"{path or '<top>'}: preset gives a section (mapping) where params.yaml holds "
                          f"{base!r}")
    for key, value in override.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key in base and isinstance(base[key], Mapping):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key_path}: preset gives {value!r} where params.yaml holds a section")
            deep_merge(base[key], value, key_path)
        elif isinstance(value, Mapping) and key in base:
            raise ConfigError(f"{key_path}: preset gives a section (mapping) where params.yaml holds {base[key]!r}")
        else:
            base[key] = value
    return base


def to_builtin(data: Any) -> Any:
    """ruamel's commented containers and scalar subclasses as plain dict/list/int/float/str/bool."""
    if isinstance(data, Mapping):
        return {str(key): to_builtin(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [to_builtin(value) for value in data]
    if isinstance(data, bool) or data is None:
        return data
    if isinstance(data, int):
        return int(data)
    if isinstance(data, float):
        return float(data)
    if isinstance(data, str):
        return str(data)
    return data


def merged_params(preset_path: str | Path, params_path: str | Path = "params.yaml") -> tuple[CommentedMap, Params]:
    """The merged YAML tree (comments kept) and its validated ``Params``; nothing is written."""
    base = read_yaml_mapping(params_path)
    preset = read_yaml_mapping(preset_path)
    merged = deep_merge(base, preset)
    try:
        params = params_from_dict(to_builtin(merged))
        check_distributed_batches(params)
    except ConfigError as error:
        raise ConfigError(f"{preset_path} over {params_path}: {error}") from None
    return merged, params


def apply_preset(preset_path: str | Path, params_path: str | Path = "params.yaml") -> Params:
    """Deep-merge ``preset_path`` over ``params_path``, validate, write ``params_path`` atomically.

    Returns the validated params. On any error ``params_path`` is untouched.
    """
    merged, params = merged_params(preset_path, params_path)
    buffer = io.StringIO()
    _round_trip_yaml().dump(merged, buffer)
    with atomic_path(Path(params_path)) as temporary:
        temporary.write_text(buffer.getvalue())
    return params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Apply (or just check) a paper preset over params.yaml.")
    parser.add_argument("action", choices=["apply", "check"],
                        help="apply: merge and write params.yaml; check: merge and validate only")
    parser.add_argument("preset", type=Path, help="preset YAML, e.g. configs/voc.yaml")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file to update")
    args = parser.parse_args(argv)
    try:
        if args.action == "apply":
            params = apply_preset(args.preset, args.params)
            print(f"{args.params}: applied {args.preset} (dataset {params.dataset.name}, "
                  f"clip {params.clip.source}:{params.clip.model_name}, "
                  f"weakclip {params.weakclip.train.iterations} it x batch {params.weakclip.train.batch_size})")
        else:
            merged_params(args.preset, args.params)
            print(f"{args.preset}: valid over {args.params}")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

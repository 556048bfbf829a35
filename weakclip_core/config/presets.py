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
from weakclip_core.config.schema import ConfigError, to_plain


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


def _comment_lines(mapping: Any, key: Any) -> tuple[list[str], list[str]] | None:
    """(the comment written beside ``key``'s value with its continuation lines, the comment lines after them) of
    a ruamel mapping; None when the value has no comment of its own. ruamel keeps an end-of-line comment and every
    comment line up to the next key in one token; continuation lines are those indented deeper than the key."""
    items = getattr(getattr(mapping, "ca", None), "items", {})
    token = (items.get(key) or [None] * 3)[2]
    if token is None or not token.value.lstrip(" ").startswith("#"):
        return None
    key_column = mapping.lc.key(key)[1]
    first, *others = token.value.split("\n")
    own = [first]
    while others and others[0].strip().startswith("#") and len(others[0]) - len(others[0].lstrip(" ")) > key_column:
        own.append(others.pop(0))
    return own, others


def _replace_value_comment(base: Any, key: Any, override: Any, source: str) -> None:
    """The comment beside a value explains that value: where the preset replaces it, the preset's own comment
    (or, without one, the preset's name) takes its place; the comment lines after it, which belong to the next
    keys, stay. Without this, applying a preset left e.g. ``depth: 12  # from scratch ...: 3 blocks``."""
    ours = _comment_lines(base, key)
    if ours is None:
        return
    theirs = _comment_lines(override, key)
    token = base.ca.items[key][2]
    column = token.column
    if theirs is None:
        replacement = [f"# {source}"]
    else:
        replacement = [theirs[0][0].strip()] + [" " * column + line.strip() for line in theirs[0][1:]]
    token.value = "\n".join(replacement + ours[1])


def deep_merge(base: Any, override: Any, path: str = "", source: str | None = None) -> Any:
    """Merge ``override`` into ``base`` in place and return it.

    Mappings merge key by key, recursively; any other value of ``override``
    (scalar, list) replaces the base value. A mapping in the preset where the
    params hold a scalar (or the reverse) is an error naming the key path:
    it is always a typo in the preset. ``source`` (the preset's name): ruamel
    trees' comments beside replaced values are the preset's (``_replace_value_comment``).
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
            deep_merge(base[key], value, key_path, source)
        elif isinstance(value, Mapping) and key in base:
            raise ConfigError(f"{key_path}: preset gives a section (mapping) where params.yaml holds {base[key]!r}")
        else:
            if source is not None and key in base and to_builtin(base[key]) != to_builtin(value):
                _replace_value_comment(base, key, override, source)
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
    label = f"{Path(preset_path).parent.name}/{Path(preset_path).name}"  # configs/voc.yaml, wherever run from
    merged = deep_merge(base, preset, source=label)
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


PLACEHOLDER_PREFIX = "/path/to/"
"""How the presets write the local files a user must name (``dataset.source: /path/to/VOCdevkit/VOC2012``)."""


def placeholder_keys(data: Any, path: str = "") -> list[str]:
    """The dotted keys whose value is still a preset placeholder path: each would stop the chain only when its
    stage starts (a DeiT init at ``cam_train``, the encoder weights at ``seg_train``, hours into a run)."""
    if isinstance(data, Mapping):
        return [key for name, value in data.items()
                for key in placeholder_keys(value, f"{path}.{name}" if path else str(name))]
    return [path] if isinstance(data, str) and data.startswith(PLACEHOLDER_PREFIX) else []


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
            _, params = merged_params(args.preset, args.params)
            print(f"{args.preset}: valid over {args.params}")
        left = placeholder_keys(to_plain(params))
        if left:
            print(f"still placeholders ({PLACEHOLDER_PREFIX}...): {', '.join(left)}; set each to a local file "
                  "before the chain runs")
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

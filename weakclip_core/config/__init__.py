"""Typed configuration: ``load_params`` validates ``params.yaml`` into the ``Params`` dataclass tree."""

from weakclip_core.config.cam import CamConfig, CamInferConfig, CamTrainConfig, MCTformerArchConfig
from weakclip_core.config.clip import ClipArchConfig, ClipConfig, ClipPretrainConfig
from weakclip_core.config.dataset import DatasetConfig, SyntheticConfig
from weakclip_core.config.params import Params, RuntimeConfig, load_params, params_from_dict
from weakclip_core.config.pseudo import PseudoConfig
from weakclip_core.config.schema import ConfigError, build_dataclass, to_plain, to_plain_without_defaults
from weakclip_core.config.seg import SegConfig, SegEvalConfig, SegTrainConfig
from weakclip_core.config.weakclip import (CrfConfig, SeedConfig, WeakClipConfig, WeakClipLossConfig,
                                           WeakClipTrainConfig)

__all__ = [
    "CamConfig", "CamInferConfig", "CamTrainConfig", "ClipArchConfig", "ClipConfig", "ClipPretrainConfig",
    "ConfigError", "CrfConfig", "DatasetConfig", "MCTformerArchConfig", "Params", "PseudoConfig",
    "RuntimeConfig", "SeedConfig", "SegConfig", "SegEvalConfig", "SegTrainConfig", "SyntheticConfig", "WeakClipConfig",
    "WeakClipLossConfig", "WeakClipTrainConfig", "build_dataclass", "load_params", "params_from_dict", "to_plain",
    "to_plain_without_defaults",
]

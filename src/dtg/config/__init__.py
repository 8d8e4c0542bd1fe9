"""Configuration: the schema (:mod:`dtg.config.schema`), its checks (:mod:`dtg.config.checks`) and
loading (:mod:`dtg.config.load`: defaults, a YAML file over them, then ``--set a.b=c``; stored configs).

``from dtg.config import Config, load_config, ...`` is the way in; the submodules are its parts.
"""

from dtg.config.checks import PAIRS, ConfigError, allowed_range, check_relations
from dtg.config.load import (
    RENAMED, apply_override, from_dict, load_config, parse_override, renamed_error, save_config, to_dict,
)
from dtg.config.schema import (
    Config, Count, DataConfig, Degrees, DTGConfig, Factor, Layers, ModelConfig, Momentum, Neutral, NonNeg,
    Percent, PosInt, Positive, Prob, RcnnStageConfig, RpnStageConfig, SemiConfig, Shear, SolverConfig,
    SparseConfig, StageConfig, SynthConfig, ViewConfig, neutral_values,
)

__all__ = [
    "PAIRS", "RENAMED", "Config", "ConfigError", "Count", "DTGConfig", "DataConfig", "Degrees", "Factor", "Layers",
    "ModelConfig", "Momentum", "Neutral", "NonNeg", "Percent", "PosInt", "Positive", "Prob", "RcnnStageConfig",
    "RpnStageConfig", "SemiConfig", "Shear", "SolverConfig", "SparseConfig", "StageConfig", "SynthConfig",
    "ViewConfig", "allowed_range", "apply_override", "check_relations", "from_dict", "load_config",
    "neutral_values", "parse_override", "renamed_error", "save_config", "to_dict",
]

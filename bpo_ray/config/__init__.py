"""The one run config: parsed and validated once at the edge, then passed down as a typed object.

A run is described by a YAML file plus dotted ``key=value`` overrides (``load.py``); without a file the command
lines read the embedded default (``tiny.yaml`` here, the demo). Every section forbids unknown keys (a typo is
an error that names the key and suggests the closest valid one), and combinations that cannot work are
rejected (``checks.py``), before Ray starts. Each stage reads only its own section
(``sections.py``), and its output is keyed by what it reads (``keys.py``).
"""

from bpo_ray.config.checks import LOOPBACK, TINY_ARCHS, TINY_SCHEME, bootstraps, serve_problems
from bpo_ray.config.keys import KEYED_IF_SET, NO_LONGER_KEYED, NOT_KEYED
from bpo_ray.config.load import (
    EMBEDDED_DEFAULT,
    PAPER_BPO,
    ConfigError,
    add_config_args,
    apply_override,
    literal_override,
    load_config,
    validate_config,
)
from bpo_ray.config.sections import (
    ActorPoolConfig,
    DataConfig,
    DistortionConfig,
    EvalConfig,
    ExistenceConfig,
    ExportConfig,
    InjectionConfig,
    LoraConfig,
    MlflowConfig,
    ModelConfig,
    NegativesConfig,
    PairsConfig,
    ResourcesConfig,
    RunConfig,
    SamplingConfig,
    Section,
    ServeConfig,
    SFTConfig,
    SyntheticDataConfig,
    TrackingConfig,
    TrainConfig,
    WandbConfig,
    WeakeningConfig,
)

__all__ = [
    "EMBEDDED_DEFAULT", "KEYED_IF_SET", "LOOPBACK", "NOT_KEYED", "NO_LONGER_KEYED", "PAPER_BPO", "TINY_ARCHS",
    "TINY_SCHEME",
    "ActorPoolConfig", "ConfigError", "DataConfig", "DistortionConfig", "EvalConfig", "ExistenceConfig",
    "ExportConfig", "InjectionConfig", "LoraConfig", "MlflowConfig", "ModelConfig", "NegativesConfig",
    "PairsConfig", "ResourcesConfig", "RunConfig", "SFTConfig", "SamplingConfig", "Section", "ServeConfig",
    "SyntheticDataConfig", "TrackingConfig", "TrainConfig", "WandbConfig", "WeakeningConfig", "add_config_args",
    "apply_override", "bootstraps", "literal_override", "load_config", "serve_problems", "validate_config",
]

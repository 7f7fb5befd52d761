"""The typed configuration schema shared by YAML recipes, command-line overrides and the API.

A recipe is a YAML file whose keys mirror :class:`Config`. ``base: other.yaml`` (relative to the
file) makes a recipe a small override of another. Command-line overrides are ``key.path=value``
with YAML-typed values. Unknown keys, wrong types and impossible values raise
:class:`ConfigError` naming the key.

Each key is declared once, with :func:`setting`: its type, default, bound or choices and help
text sit together at the field. :func:`validate` checks those bounds and choices from the field
metadata, then the rules that span several keys; :func:`resolve` turns ``auto`` inference rules
into the method's own; :func:`describe` writes the ``cskd train --help`` listing from the same
metadata. :func:`load_config` and :func:`from_dict` return a validated, resolved config.
"""

from .recipes import (
    apply_overrides,
    describe,
    dump_config,
    from_dict,
    load_config,
    parse_override,
    read_recipe,
    to_dict,
)
from .rules import resolve, validate
from .schema import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    Config,
    DataConfig,
    DistillConfig,
    OptimConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    get_value,
    setting,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AugmentConfig",
    "Config",
    "DataConfig",
    "DistillConfig",
    "OptimConfig",
    "StudentConfig",
    "TeacherConfig",
    "TrainConfig",
    "apply_overrides",
    "describe",
    "dump_config",
    "from_dict",
    "get_value",
    "load_config",
    "parse_override",
    "read_recipe",
    "resolve",
    "setting",
    "to_dict",
    "validate",
]

"""cskd: Cumulative Spatial Knowledge Distillation for Vision Transformers.

The public API, importable from ``cskd`` directly (each loaded on first use, so that
``import cskd.errors`` or the rank helpers do not load torch and timm):

- running: :func:`load_config`, :func:`train` (:class:`RunStopped` when a signal stopped it),
  :func:`evaluate_checkpoint`, :func:`build_cache`,
  :func:`diagnose_run`, :func:`run_demo`
- models: :class:`DenseTeacher`, :class:`DenseStudent` (a ViT), :class:`MapStudent` (a
  hierarchical or convolutional student), their base :class:`DistilledStudent`,
  :func:`load_teacher`, :func:`load_student`, :func:`combine_heads`
- your own training loop: :class:`CSKDTask` (a timm training task)
- the method: :class:`Distiller`, :func:`objective`, :class:`ObjectiveWeights`,
  :func:`cskd_loss`, :func:`token_loss`, :func:`base_loss`, :func:`fused_target`,
  :func:`local_weight`, :func:`training_progress`, :func:`align_to_grid`
- errors: every error a user can fix (:mod:`cskd.errors`)
"""

from __future__ import annotations

import importlib

_HOMES = {
    "load_config": "cskd.config",
    "Config": "cskd.config",
    "train": "cskd.training.run",
    "RunStopped": "cskd.training.run",
    "evaluate_checkpoint": "cskd.commands.eval",
    "build_cache": "cskd.commands.cache",
    "diagnose_run": "cskd.commands.diagnose",
    "run_demo": "cskd.commands.demo",
    "DenseTeacher": "cskd.method.adapters",
    "DenseStudent": "cskd.method.adapters",
    "MapStudent": "cskd.method.adapters",
    "DistilledStudent": "cskd.method.adapters",
    "TeacherOutput": "cskd.method.adapters",
    "StudentOutput": "cskd.method.adapters",
    "combine_heads": "cskd.method.adapters",
    "load_teacher": "cskd.training.models",
    "load_student": "cskd.training.models",
    "Distiller": "cskd.method.distiller",
    "CSKDTask": "cskd.training.task",
    "objective": "cskd.method.losses",
    "ObjectiveWeights": "cskd.method.losses",
    "cskd_loss": "cskd.method.losses",
    "token_loss": "cskd.method.losses",
    "base_loss": "cskd.method.losses",
    "fused_target": "cskd.method.losses",
    "local_weight": "cskd.method.schedules",
    "training_progress": "cskd.method.schedules",
    "align_to_grid": "cskd.method.align",
    "CheckpointError": "cskd.errors",
    "ConfigError": "cskd.errors",
    "DataError": "cskd.errors",
    "CacheError": "cskd.errors",
    "DistributedError": "cskd.errors",
    "GridError": "cskd.errors",
    "NonFiniteError": "cskd.errors",
    "NonFiniteLossError": "cskd.errors",
    "TeacherError": "cskd.errors",
    "ResourceError": "cskd.errors",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'cskd' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__

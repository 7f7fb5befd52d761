"""A training run: its assembly and epoch loop (run), the models (models), the other factories
(build), the saved state and resume (state), the step (engine), evaluation, the final outputs
(outputs), the pre-flight, the diagnostics and a teacher map's locality.

Importing it registers the library's own timm models (:mod:`cskd.models`: ``bagnet19``,
``bagnet27``), so that every build by name below (runs, the pre-flight, ``load_teacher``, the
commands) knows them."""

from .. import models  # noqa: F401  (registers cskd's timm models before any timm.create_model)

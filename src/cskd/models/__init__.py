"""timm models this library adds, registered with timm on import (``timm.create_model`` then
builds them by name, as a config's ``student.name`` / ``teacher.name``).

- :mod:`.bagnet`: ``bagnet19``, a ResNet whose map cells see a bounded 19 x 19 px patch of the
  image (a BagNet, Brendel and Bethge, ICLR 2019): a teacher whose local answers are local.

``cskd.training`` imports this package, so every run, command and pre-flight sees the names;
code using timm alone imports ``cskd.models`` first.
"""

from . import bagnet

__all__ = ["bagnet"]

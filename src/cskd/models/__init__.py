"""timm models this library adds, registered with timm on import (``timm.create_model`` then
builds them by name, as a config's ``student.name`` / ``teacher.name``).

- :mod:`.bagnet`: ``bagnet19`` and ``bagnet27``, ResNets whose map cells see a bounded 19 x 19
  (27 x 27) px patch of the image (BagNets, Brendel and Bethge, ICLR 2019): teachers whose local
  answers are local.

``cskd.training`` imports this package, so every run, command and pre-flight sees the names;
code using timm alone imports ``cskd.models`` first.
"""

from . import bagnet

__all__ = ["bagnet"]

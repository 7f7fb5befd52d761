"""``python -m cskd`` (what ``torchrun -m cskd`` runs)."""

import sys

from .cli import main

sys.exit(main())

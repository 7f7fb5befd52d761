"""``python -m cskd`` (what ``torchrun -m cskd`` runs)."""

import sys

from torch.distributed.elastic.multiprocessing.errors import record

from .cli import main

# record: under torchrun, an uncaught error's traceback goes into torchrun's failure summary
sys.exit(record(main)())

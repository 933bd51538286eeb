"""``python -m svdcompress`` (and ``torchrun -m svdcompress``) runs the command line."""

import sys

from .cli import main

sys.exit(main())

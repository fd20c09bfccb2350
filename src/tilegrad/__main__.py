"""``python -m tilegrad`` (and ``torchrun -m tilegrad``) runs the command line."""

import sys

from .cli import main

sys.exit(main())

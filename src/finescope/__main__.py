"""`python -m finescope`: the CLI (so `torchrun -m finescope <stage>` and `accelerate launch -m finescope` work)."""

import sys

from .cli import main

sys.exit(main())

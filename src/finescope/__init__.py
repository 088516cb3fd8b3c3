"""FineScope: derive compact, domain-specialised LLMs from a larger pretrained one.

Stages (each a `run(cfg, out)` over files in a run directory, listed in finescope.stages):
curate → prune → recover → eval, then the report.
The CLI is `finescope` (see `finescope --help` and README.md).
"""

__version__ = "0.1.0"


class FinescopeError(Exception):
    """A user-facing error: the CLI prints its message on one line, without a traceback."""

"""Progress bars on stderr: live on a terminal, one whole line every 30 s in a log (FINESCOPE_PROGRESS=0: silent)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable


class _LogLines:
    """A file for tqdm that turns its carriage-return redraws into whole lines (for logs and CI output)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it", **kw):
    """A progress bar on stderr. On a terminal, a live tqdm bar; otherwise (a log file, CI) one line every
    `FINESCOPE_PROGRESS_INTERVAL` seconds (default 30) plus the final line. FINESCOPE_PROGRESS=0 silences it."""
    from tqdm.auto import tqdm

    if os.environ.get("FINESCOPE_PROGRESS") == "0":
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=True, **kw)
    if sys.stderr.isatty():
        return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, **kw)
    interval = float(os.environ.get("FINESCOPE_PROGRESS_INTERVAL", "30"))
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        file=_LogLines(sys.stderr),
        ncols=100,
        ascii=True,
        mininterval=interval,
        maxinterval=max(interval, 10.0),
        **kw,
    )

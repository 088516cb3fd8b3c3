"""Progress bars on stderr: live on a terminal, one whole line every 30 s in a log (FINESCOPE_PROGRESS=0: silent)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable

_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class _LogLines:
    """A file for tqdm that turns its redraws into whole plain lines (for logs and CI output): carriage returns
    and cursor movements (ESC[A, which tqdm writes to place nested bars) are dropped, and a line equal to the one
    before it (the final 100 % line that tqdm draws again on close) is written once."""

    def __init__(self, stream):
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        for part in _CONTROL.sub("", text).replace("\r", "\n").split("\n"):
            line = part.strip()
            if line and line != self.last:
                self.stream.write(line + "\n")
                self.last = line

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

"""Helpers for user-facing messages: a refusal is one line, and no value quoted in it can flood the terminal.

from finescope.messages import one_line, quote
raise ConfigError(f"{where} = {quote(value)}: must be an integer")   # a 10 MB value prints as 200 chars
"""

from __future__ import annotations

import re
from typing import Any

QUOTE_LIMIT = 200


def flat(text: Any) -> str:
    """`text` on one line: line breaks (e.g. in a path or a library's message) become spaces."""
    return re.sub(r"[\r\n]+", " ", str(text))


def one_line(text: Any, limit: int = 300) -> str:
    """A message (ours or a library's) squeezed onto one line and cut at `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[: limit - 20]}… ({len(text):,} chars)"


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """repr(value) for a message, cut at `limit` characters. A container that expands to very many values (a YAML
    alias bomb shares one subtree thousands of times) is never repr'd whole."""
    if isinstance(value, (dict, list, tuple)) and count_values(value, limit) >= limit:
        return f"<{type(value).__name__} of many values>"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} chars)"


def count_values(data: Any, limit: int) -> int:
    """Values reachable from `data`, counting a shared subtree every time it is reached; stops at `limit`."""
    seen, stack = 0, [data]
    while stack and seen < limit:
        node = stack.pop()
        seen += 1
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return seen

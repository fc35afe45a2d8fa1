"""How many tokens texts are counted as, before any provider has seen them: by the per-key API limits and by the
upstream's budget alike."""

from __future__ import annotations

import math
from collections.abc import Sequence

# OpenAI's rule of thumb for English.
CHARS_PER_TOKEN = 4


def estimate_tokens(texts: Sequence[str]) -> int:
    """About four characters per token, rounded up per text, and at least one token per text."""
    return sum(max(1, math.ceil(len(text) / CHARS_PER_TOKEN)) for text in texts)

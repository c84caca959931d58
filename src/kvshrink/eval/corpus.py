"""The embedded default corpus: English prose from the standard library's `pydoc_data.topics`."""
from __future__ import annotations

import functools
import re


@functools.lru_cache(maxsize=1)
def pydoc_text() -> str:
    """About 450 KB of Python documentation prose, topics in a fixed (sorted) order, whitespace normalised."""
    from pydoc_data.topics import topics

    parts = [re.sub(r"[ \t]+", " ", topics[k]).strip() for k in sorted(topics)]
    return "\n\n".join(parts)


def split(text: str, fraction: float = 0.8) -> tuple[str, str]:
    """(first part, rest) at a paragraph boundary near `fraction`: calibration text never overlaps evaluation text."""
    cut = text.rfind("\n\n", 0, int(len(text) * fraction))
    cut = cut if cut > 0 else int(len(text) * fraction)
    return text[:cut], text[cut:]

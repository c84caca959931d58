"""Records of the peer runs: one JSON object per line, appended as they come (standard library only, so both the
kvpress and the kvshrink environments import it)."""
from __future__ import annotations

import json
from pathlib import Path


def records(path: Path):
    """The records of `path`, in order; a line cut by an interrupted run is skipped; no file, no records."""
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            continue

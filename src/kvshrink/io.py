"""Atomic file writes: a file the library writes is either the old one or the complete new one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def temp_beside(path: str | Path, suffix: str = "") -> tuple[int, str]:
    """(fd, name) of a new temporary file in `path`'s folder, to be renamed onto `path` once complete. Its mode is
    what an ordinary new file gets (0666 less the umask), not mkstemp's private 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.chmod(tmp, ordinary_mode())
    return fd, tmp


def ordinary_mode() -> int:
    """The mode a new file gets under the process's umask (0666 less the umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path

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


_STATUS = "/proc/self/status"


def _proc_umask() -> int | None:
    """The umask from /proc/self/status (Linux >= 4.7), read without changing it; None where it is not there."""
    try:
        with open(_STATUS, encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _umask_at_import() -> int:
    """The umask when this module is imported; without /proc it can only be read by setting it, done once, here."""
    mask = _proc_umask()
    if mask is None:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_IMPORT_UMASK = _umask_at_import()


def current_umask() -> int:
    """The process's umask, read without changing it (setting and resetting it on every call raced with other
    threads' file creation); where /proc is missing, the umask when kvshrink.io was imported."""
    mask = _proc_umask()
    return _IMPORT_UMASK if mask is None else mask


def ordinary_mode() -> int:
    """The mode a new file gets under the process's umask (0666 less the umask)."""
    return 0o666 & ~current_umask()


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

"""kvshrink.io: the mode of files written atomically, read without touching the process's umask."""
from __future__ import annotations

import os
import sys

import pytest

import kvshrink.io as kio


def _no_umask(*_):
    raise AssertionError("ordinary_mode() called os.umask: setting and resetting it races with other threads")


def test_ordinary_mode_never_sets_the_umask(monkeypatch, tmp_path):
    expected = 0o666 & ~kio.current_umask()
    monkeypatch.setattr(os, "umask", _no_umask)
    assert kio.ordinary_mode() == expected
    written = kio.atomic_write_text(tmp_path / "a.json", "{}")
    assert written.stat().st_mode & 0o777 == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux's")
def test_ordinary_mode_follows_a_umask_changed_after_import(tmp_path):
    old = os.umask(0o077)
    try:
        assert kio.current_umask() == 0o077
        assert kio.ordinary_mode() == 0o600
        assert kio.atomic_write_text(tmp_path / "b.json", "{}").stat().st_mode & 0o777 == 0o600
        os.umask(0o002)
        assert kio.ordinary_mode() == 0o664
    finally:
        os.umask(old)


def test_without_proc_the_umask_read_at_import_is_used(monkeypatch, tmp_path):
    monkeypatch.setattr(kio, "_STATUS", str(tmp_path / "no-such-status"))
    monkeypatch.setattr(os, "umask", _no_umask)
    assert kio.current_umask() == kio._IMPORT_UMASK
    assert kio.ordinary_mode() == 0o666 & ~kio._IMPORT_UMASK

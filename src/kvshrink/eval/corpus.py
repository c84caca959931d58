"""The embedded corpora, split by use so that calibration never sees text an evaluation prompt is built from.

- `evaluation_text()`: English prose from the standard library's `pydoc_data.topics`. Every evaluation prompt is
  built from it: the RULER-style essay haystack and needle words (`ruler.py`, from anywhere in it), the passkey
  filler (`passkey.py`), and, from its held-out last 20% (`heldout_text()`), the ppl / kl / match windows,
  `chat20`'s passages and the benchmark's prompts.
- `calibration_text()`: the docstrings of a fixed list of pure-Python standard-library modules, which no
  evaluation prompt draws from (a test checks every calibration window against generated prompts).

Until this split, calibration read the first 80% of the pydoc corpus (`legacy_calibration_text()`), which the
RULER haystack and the passkey filler also draw from; the evaluation side was kept as it was so that the
committed records' prompts stay the same (docs/calibration.md).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import re
import warnings

#: modules whose docstrings make the calibration text, in this order (pdb is left out: its docstring repeats the
#: pydoc topic on the debugger, which evaluation prompts use)
CALIBRATION_MODULES = (
    "argparse", "calendar", "collections", "configparser", "contextlib", "csv", "dataclasses", "difflib",
    "email.message", "email.utils", "enum", "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt",
    "gettext", "glob", "gzip", "heapq", "hmac", "html.parser", "http.client", "http.cookiejar", "imaplib",
    "inspect", "ipaddress", "json", "logging", "logging.handlers", "mailbox", "mimetypes", "netrc", "numbers",
    "optparse", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue", "random",
    "sched", "secrets", "selectors", "shlex", "shutil", "smtplib", "socketserver", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback",
    "unittest.case", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "zipfile",
)
#: what a profile's calibration record names as its text when calibrate() read the default
CALIBRATION_SOURCE = "standard-library docstrings (kvshrink.eval.corpus.calibration_text)"
HELDOUT_FRACTION = 0.8


@functools.lru_cache(maxsize=1)
def pydoc_text() -> str:
    """About 450 KB of Python documentation prose, topics in a fixed (sorted) order, whitespace normalised."""
    from pydoc_data.topics import topics

    parts = [re.sub(r"[ \t]+", " ", topics[k]).strip() for k in sorted(topics)]
    return "\n\n".join(parts)


def evaluation_text() -> str:
    """The text every evaluation prompt is built from (the pydoc corpus, whole)."""
    return pydoc_text()


def heldout_text() -> str:
    """The evaluation text's last 20% (from a paragraph boundary): the windows of ppl, kl and match, chat20's
    passages, the benchmark's prompts."""
    return split(evaluation_text(), HELDOUT_FRACTION)[1]


def _docstrings(module_name: str) -> list[str]:
    """A module's docstring, then those of its public classes and functions (defined there, in name order) and of
    the classes' public methods."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # a trimmed installation: the text changes, and so does its hash in the profile
        return []
    docs = [module.__doc__]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            docs.append(obj.__doc__)
        if inspect.isclass(obj):
            docs += [f.__doc__ for m, f in sorted(vars(obj).items()) if not m.startswith("_") and inspect.isfunction(f)]
    return [inspect.cleandoc(d) for d in docs if d]


@functools.lru_cache(maxsize=1)
def calibration_text() -> str:
    """About 460 KB of docstrings of `CALIBRATION_MODULES`, whitespace normalised as `pydoc_text`: text for
    calibration that shares no passage with `evaluation_text()`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parts = [d for name in CALIBRATION_MODULES for d in _docstrings(name)]
    return "\n\n".join(re.sub(r"[ \t]+", " ", d).strip() for d in parts)


def legacy_calibration_text() -> str:
    """What calibration read before the split: the pydoc corpus's first 80%. The committed profiles were calibrated
    on it; pass it as `calibrate(..., text=legacy_calibration_text())` to reproduce one."""
    return split(pydoc_text(), HELDOUT_FRACTION)[0]


def text_digest(text: str) -> str:
    """A short fingerprint of a text (16 hex digits of its SHA-256), recorded with a calibration."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def split(text: str, fraction: float = HELDOUT_FRACTION) -> tuple[str, str]:
    """(first part, rest) at a paragraph boundary near `fraction`."""
    cut = text.rfind("\n\n", 0, int(len(text) * fraction))
    cut = cut if cut > 0 else int(len(text) * fraction)
    return text[:cut], text[cut:]

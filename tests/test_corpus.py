"""The corpus split: no calibration window shares a passage with a prompt the evaluation builds, and the evaluation's
prompts are still those the committed records were measured on."""
from __future__ import annotations

import hashlib
import json
import re

import pytest

from kvshrink.calibrate import calibration_windows
from kvshrink.eval.corpus import (calibration_text, evaluation_text, heldout_text, legacy_calibration_text,
                                  pydoc_text, split)
from kvshrink.eval.passkey import passkey_prompt
from kvshrink.eval.ruler import ruler_sample

PASSAGE = 64  # characters of identical text (whitespace collapsed) that count as a shared passage
ESSAY_TASKS = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multivalue", "niah_multiquery")


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _shares_a_passage(text: str, other: str) -> bool:
    """Whether `text` and `other` hold a common run of 2 x PASSAGE characters (tested as every PASSAGE-character
    piece of `text` at a step of PASSAGE / 2)."""
    a, b = _flat(text), _flat(other)
    step = PASSAGE // 2
    return any(a[i:i + PASSAGE] in b for i in range(0, max(len(a) - PASSAGE, 0) + 1, step))


@pytest.fixture(scope="module")
def tok(real_model):
    return real_model[1]


@pytest.fixture(scope="module")
def prompts(tok) -> list[str]:
    """Evaluation prompts as text: RULER's corpus-haystack tasks at 2k and 4k, passkeys at 2k (seeds 0-1), and the
    held-out text the ppl / kl / match windows and chat20 come from."""
    out = [ruler_sample(t, tok, c, s).text for t in ESSAY_TASKS for c in (2048, 4096) for s in (0, 1)]
    out += [tok.decode(passkey_prompt(tok, 2048, d, s).input_ids[0]) for d in (0.1, 0.5, 0.9) for s in (0, 1)]
    return out + [heldout_text()]


def test_the_parts_are_the_documented_ones():
    assert evaluation_text() == pydoc_text()
    assert (legacy_calibration_text(), heldout_text()) == split(pydoc_text(), 0.8)
    assert len(calibration_text()) > 300_000  # enough for 3 windows of 4,096 tokens (the low-rank bases)


def test_calibration_and_evaluation_texts_share_no_passage():
    assert not _shares_a_passage(calibration_text(), evaluation_text())


def test_no_calibration_window_appears_in_an_evaluation_prompt(tok, prompts):
    ids = tok(calibration_text(), return_tensors="pt", add_special_tokens=False).input_ids
    windows = [w for seed in (0, 1) for w in calibration_windows(ids, 2, 512, 32, seed)]  # calibrate's tada default
    windows += calibration_windows(ids, 3, 4096, 0, 0)  # the bases' windows are as long
    texts = [tok.decode(c[0].tolist() + s[0].tolist()) for c, s in windows]
    assert all(len(t) > 1500 for t in texts)
    for p in prompts:
        assert not any(_shares_a_passage(t, p) for t in texts)


def test_the_check_finds_a_shared_passage_where_there_is_one(tok, prompts):
    """The same check on the text the prompts are built from: every corpus-haystack prompt shares passages with it,
    and so do the legacy calibration windows with some prompt (the overlap the split removed)."""
    assert all(_shares_a_passage(p, evaluation_text()) for p in prompts)
    ids = tok(legacy_calibration_text(), return_tensors="pt", add_special_tokens=False).input_ids
    windows = [tok.decode(c[0].tolist()) for c, _ in calibration_windows(ids, 8, 4096, 0, 0)]
    assert any(_shares_a_passage(w, p) for w in windows for p in prompts)


def test_evaluation_prompts_are_those_of_the_committed_records(tok):
    """Digests of prompts built before the split (SmolLM2's tokenizer): changing the evaluation text would change
    the prompts every committed RULER and passkey record was measured on. The records were made on Python 3.11.7,
    whose `pydoc_data.topics` this corpus is; another Python's topics make other prompts (and other records)."""
    if hashlib.sha256(pydoc_text().encode()).hexdigest()[:16] != "51b1297815978658":
        pytest.skip("this Python's pydoc_data.topics is not the corpus the committed records were built from")
    h = hashlib.sha256()
    for task in ESSAY_TASKS:
        for seed in (0, 1):
            h.update(ruler_sample(task, tok, 2048, seed).text.encode())
    assert h.hexdigest()[:16] == "dd1f8663cec39913"
    h = hashlib.sha256()
    for seed in (0, 1):
        for depth in (0.1, 0.5, 0.9):
            h.update(json.dumps(passkey_prompt(tok, 2048, depth, seed).input_ids.tolist()).encode())
    assert h.hexdigest()[:16] == "206bc3be43cbd8fb"
    assert hashlib.sha256(heldout_text().encode()).hexdigest()[:16] == "c838934f2bc0943e"

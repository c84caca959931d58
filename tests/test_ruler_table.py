"""benchmarks/ruler_table.py's bootstrap: the published splitmix64 stream, paired differences, the interval's ends."""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rt():
    spec = importlib.util.spec_from_file_location("ruler_table", ROOT / "benchmarks" / "ruler_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_splitmix64_is_the_published_stream(rt):
    stream = rt.splitmix64(0)
    assert [next(stream) for _ in range(3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_interval_ends_are_the_51st_and_1950th_resampled_means(rt):
    rng = random.Random(1)
    values = [rng.random() for _ in range(11)]
    draws = rt.resamples(11)
    assert len(draws) == 2000 and all(len(d) == 11 and max(d) < 11 for d in draws)
    means = sorted(sum(values[i] for i in d) / 11 for d in draws)
    assert rt.interval(values, draws) == (means[50], means[1949])
    lo, hi = rt.interval(values, draws)
    assert lo < sum(values) / 11 < hi


def _rec(task: str, score: float) -> dict:
    return {"metrics": {task: score}, "memory": {"ratio": 0.5}, "seconds": 1.0}


def test_table_pairs_differences_by_prompt(rt):
    """A row 0.25 under `full` on every prompt has the difference interval [-25, -25] points however widely the
    prompts' scores spread (so its average's own interval is wide); an identical row has [0, 0]."""
    prompts = [("niah_single_1", s) for s in range(4)] + [("vt", s) for s in range(4)]
    spread = [0.25, 1.0, 0.5, 0.25, 1.0, 1.0, 0.5, 0.75]
    full = {k: _rec(k[0], x) for k, x in zip(prompts, spread)}
    same = {k: _rec(k[0], x) for k, x in zip(prompts, spread)}
    worse = {k: _rec(k[0], x - 0.25) for k, x in zip(prompts, spread)}
    text, rows = rt.table({"full": full, "same": same, "worse": worse}, ["full", "same", "worse"], False)
    by = {r[0]: r for r in rows}
    assert by["same"][7] == (0.0, (0.0, 0.0)) and by["worse"][7] == (-0.25, (-0.25, -0.25))
    lo, hi = by["worse"][6]
    assert hi - lo > 0.2 and by["worse"][5] == 8
    assert "| `worse` | 0.500 | 0.25 | 0.56 | 0.406 [" in text and "| -25.0 [-25.0, -25.0] | 1.0 | 8 |" in text

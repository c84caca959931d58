"""benchmarks/check_docs.py: the README's and the docs' headline tables equal their records, and a figure changed by
hand is caught."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "check_docs.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_the_committed_tables_equal_their_records():
    out = run()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tables equal to their records" in out.stdout


@pytest.fixture
def copies(tmp_path) -> tuple[Path, Path]:
    """A copy of the README and of docs/ to alter."""
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", readme)
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    return readme, docs


def _alter(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{old!r} is not one cell of {path.name}"
    path.write_text(text.replace(old, new), encoding="utf-8")


@pytest.mark.parametrize("where, old, new, named", [
    ("README.md", "| `kivi:bits=4` | 0.321 | 0.852 [0.772, 0.923] |",
     "| `kivi:bits=4` | 0.321 | 0.862 [0.772, 0.923] |",
     "row `kivi:bits=4`, column 'RULER avg [95% interval]': the doc says '0.862 [0.772, 0.923]', the records "
     "'0.852 [0.772, 0.923]'"),
    ("README.md", "| 0.263 | +0.35% | 0.0036 | 6/6 |", "| 0.263 | +0.53% | 0.0036 | 6/6 |",
     "column 'Δppl': the doc says '+0.53%', the records '+0.35%'"),
    ("README.md", "| -3.9 [-10.5, +1.0] | 44 |", "| -3.9 [-10.5, +1.0] | 40 |", "column 'prompts'"),
    ("docs/seed-claims.md", "| 0.441 [0.177, 0.727] | -41.2 [-68.5, -16.4] |",
     "| 0.441 [0.177, 0.727] | -41.2 [-68.5, -6.4] |", "table seed-claims-4k"),
    # a table limited to seed 0 (a peer answered 11 prompts): kvshrink's rows there cover 11 of their 44 too
    ("docs/seed-claims.md", "| 0.573 [0.300, 0.827] | -28.0 [-57.6, -3.0] | 11 |",
     "| 0.573 [0.300, 0.827] | -28.0 [-57.6, -3.0] | 44 |", "column 'prompts'"),
    ("docs/seed-claims.md", "| 0.638 [0.406, 0.855] | -21.5 [-48.6, -0.3] | 11 |",
     "| 0.656 [0.406, 0.855] | -21.5 [-48.6, -0.3] | 11 |", "the records '0.638 [0.406, 0.855]'"),
])
def test_a_figure_changed_by_hand_fails_the_check(copies, where, old, new, named):
    readme, docs = copies
    _alter(readme if where == "README.md" else docs / Path(where).name, old, new)
    out = run("--readme", str(readme), "--docs", str(docs))
    assert out.returncode == 1
    assert named in out.stdout and "1 cell(s) differ from the records" in out.stdout


def test_a_table_without_its_marker_fails_the_check(copies):
    readme, docs = copies
    _alter(readme, "<!-- check_docs: readme-smollm2 -->\n", "")
    out = run("--readme", str(readme), "--docs", str(docs))
    assert out.returncode == 1 and "no table marked <!-- check_docs: readme-smollm2 -->" in out.stdout


def test_the_check_imports_no_project_code():
    """An independent check: the script reads the records with json and computes everything itself."""
    imports = [line.split()[1] for line in SCRIPT.read_text().splitlines() if line.startswith(("import ", "from "))]
    assert set(imports) <= {"__future__", "argparse", "json", "re", "sys", "pathlib", "statistics"}, imports

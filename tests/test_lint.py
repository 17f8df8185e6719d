"""The code passes the project's small lint rule set (pyproject's [tool.ruff.lint]: unused imports and
variables, redefinitions, syntax errors) over the package, the runtime, tests, benchmarks and examples."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_ruff_passes():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    assert Path(ruff).exists(), "ruff is not installed (it is in the test extras: pip install -e '.[test]')"
    p = subprocess.run([ruff, "check", "mm_convert", "train", "tests", "benchmarks", "examples"], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:]

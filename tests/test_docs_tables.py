"""docs/format.md's name tables are the specs' own (mm_convert.describe), so the docs cannot drift from the code."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "format.md"


def test_format_doc_holds_the_generated_tables():
    tables = subprocess.run([sys.executable, "-m", "mm_convert.describe"], capture_output=True, text=True,
                            check=True).stdout
    assert tables.count("### ") >= 3
    assert tables in DOC.read_text(), "docs/format.md is out of date: rerun python -m mm_convert.describe"

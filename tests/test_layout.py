"""Package layout rules: no module over 700 lines, and the scripted test fake is imported by no production
module (only tests and the budget benchmark use it)."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "treegrpo"


def test_no_module_over_700_lines() -> None:
    long = {p.name: n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 700}
    assert not long, long


def test_the_scripted_fake_is_not_imported_by_production_modules() -> None:
    pattern = re.compile(
        r"^\s*(from treegrpo\.scripted|from treegrpo import .*\bscripted\b|import treegrpo\.scripted)", re.M
    )
    users = [p.name for p in SRC.rglob("*.py") if p.name != "scripted.py" and pattern.search(p.read_text())]
    assert users == []

"""tests/data holds copies of the contract and the seed API page, so the suite runs
from any clone; where the project's shared/ folder sits beside the checkout, the
copies must still match it."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.mark.parametrize("name, original", [
    ("CONTRACT.md", "CONTRACT.md"),
    ("batch-connection.txt", "seed/batch-connection.txt"),
])
def test_copies_match_shared(name: str, original: str) -> None:
    source = SHARED / original
    if not source.exists():
        pytest.skip("shared/ is not beside this checkout")
    assert (DATA / name).read_bytes() == source.read_bytes(), f"refresh tests/data/{name}"

"""The README's example test, extracted from README.md and run as a user would run it, so
the README cannot drift from the harness (boots a guest and live-migrates it: ~1 min)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
START, END = "<!-- example:start -->", "<!-- example:end -->"


def example_code(text: str) -> str:
    """The first ```python block between the example markers of README text."""
    try:
        section = text[text.index(START) + len(START):text.index(END)]
    except ValueError:
        raise AssertionError(f"README has no {START} ... {END} section") from None
    m = re.search(r"^```python\n(.*?)^```$", section, re.S | re.M)
    if m is None:
        raise AssertionError("README's example section has no ```python block")
    return m.group(1)


def test_example_extraction_fails_loudly() -> None:
    with pytest.raises(AssertionError, match="no <!-- example:start -->"):
        example_code("# README\n")
    with pytest.raises(AssertionError, match="no ```python block"):
        example_code(f"{START}\n```sh\nls\n```\n{END}\n")
    assert example_code(f"{START}\n```python\nx = 1\n```\n{END}") == "x = 1\n"


@pytest.mark.integration
def test_readme_example_runs(pytester: pytest.Pytester, harness_rundir: Path,
                             tmp_path: Path) -> None:
    code = example_code(README.read_text())
    assert "def test_" in code and "(vm)" in code
    pytester.makepyfile(test_example=code)
    art = tmp_path / "artifacts"
    res = pytester.runpytest("-v", f"--harness-artifacts={art}")
    res.assert_outcomes(passed=1)
    assert not art.exists()  # a passing test keeps nothing
    assert list(harness_rundir.iterdir()) == []

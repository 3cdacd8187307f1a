"""The documentation site builds without a warning (broken links, anchors or nav entries fail it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_strict_build(tmp_path: Path) -> None:
    """`mkdocs build --strict` passes: every page in the nav exists and every internal link resolves."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_gives_the_two_commands() -> None:
    """The README names the demo command and the test command, and .ci/run calls that test command."""
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/demo" in readme
    assert "bash scripts/test-all" in readme
    assert "scripts/test-all" in (ROOT / ".ci" / "run").read_text()

"""The docs site builds in strict mode, and the README's quick start matches CI."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
    reason="mkdocs / mkdocstrings not installed (the `docs` extra; `nox -s docs` builds the site in CI)",
)
def test_docs_build_in_strict_mode(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reference = (tmp_path / "site" / "reference" / "trainer" / "index.html").read_text()
    assert "runner_loop" in reference  # the API reference is generated from the docstrings


def test_readme_quick_start_is_the_two_commands_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", readme, re.DOTALL)
    commands = [line.strip() for block in blocks[:2] for line in block.strip().splitlines()]
    assert commands[:2] == ["pip install . && agl-async demo", "pip install nox && nox -s tests"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install nox && nox -s tests" in ci


def test_every_docs_page_is_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    missing = [page for page in pages if page not in config]
    assert missing == []

"""Every Python example in the docs runs, as a user would paste it (issue 16, bug 11).

The rules, for whoever writes docs:

* every ```` ```python ```` block of ``docs/*.md`` and ``README.md`` is run, unless the line right
  before its fence is ``<!-- not run: <why> -->`` (a signature, another library's code);
* a block whose first line is ``# <name>.py`` is that file: it is written into the page's own
  directory (so later blocks of the page can import it); when a page has test files
  (``test_*.py``, with their ``conftest.py``), pytest runs them there — and a block that defines
  test functions must be such a file (else they would only be defined, never run);
* every other block is a script, run with ``python`` in that directory, in page order; it must
  finish by itself and exit 0 (start runs under ``if __name__ == "__main__":`` as a script would).

Each page runs in a fresh temporary directory with the repository on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([*(ROOT / "docs").rglob("*.md"), ROOT / "README.md"])
NOT_RUN = re.compile(r"^<!-- not run: (?P<why>.+\S) -->$")
FENCE = re.compile(r"^```python\s*$")
FILE_NAME = re.compile(r"^# (?P<name>[A-Za-z_][\w]*\.py)\s*$")
TIMEOUT = 120


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    code: str
    not_run: str | None  # the reason, when marked

    @property
    def file_name(self) -> str | None:
        first = self.code.splitlines()[0] if self.code.strip() else ""
        match = FILE_NAME.match(first)
        return match["name"] if match else None


def python_blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            start = i
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            marker = NOT_RUN.match(lines[start - 1].strip()) if start > 0 else None
            blocks.append(Block(page, start + 1, "\n".join(body) + "\n", marker["why"] if marker else None))
        i += 1
    return blocks


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    for name in (
        "AGL_CURRENT_ROLE",
        "AGL_SERVER_HOST",
        "AGL_SERVER_PORT",
        "AGL_MANAGED_STORE",
        "AGL_SERVER_TOKEN",
    ):
        env.pop(name, None)
    return subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


@pytest.mark.parametrize(
    "page", PAGES_WITH_CODE, ids=[p.relative_to(ROOT).as_posix() for p in PAGES_WITH_CODE]
)
def test_the_python_examples_of_a_page_run(page: Path, tmp_path: Path, no_leftover_processes: None) -> None:
    test_files = []
    for n, block in enumerate(python_blocks(page)):
        if block.not_run is not None:
            continue
        where = f"{page.relative_to(ROOT)}:{block.line}"
        if block.file_name is not None:
            (tmp_path / block.file_name).write_text(block.code)
            if block.file_name.startswith("test_"):
                test_files.append(block.file_name)
            continue
        script = tmp_path / f"example_{n}.py"
        script.write_text(block.code)
        result = _run([sys.executable, str(script)], tmp_path)
        assert result.returncode == 0, f"{where} failed:\n{block.code}\n{result.stdout}{result.stderr}"
    if test_files:
        result = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *test_files], tmp_path)
        assert result.returncode == 0, f"{page.relative_to(ROOT)}: the tests it shows fail:\n{result.stdout}"


def test_every_python_block_is_run_or_says_why_not() -> None:
    """A block left out of the run states why (``<!-- not run: ... -->``); the marker stands right
    before a python fence and nowhere else."""
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith("<!-- not run"):
                assert NOT_RUN.match(line.strip()), f"{page}:{i + 1}: write <!-- not run: <why> -->"
                assert i + 1 < len(lines) and FENCE.match(lines[i + 1]), f"{page}:{i + 1}: not before a block"
        for block in python_blocks(page):
            # A test in a block that is not a test file would only be defined, never run.
            if re.search(r"^(async )?def test_", block.code, re.MULTILINE):
                name = block.file_name or ""
                assert name.startswith("test_"), f"{page}:{block.line}: start the block with # test_<name>.py"
    assert PAGES_WITH_CODE, "no python examples found"
    runnable = [b for p in PAGES_WITH_CODE for b in python_blocks(p) if b.not_run is None]
    assert len(runnable) >= 5

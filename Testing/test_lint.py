"""Lint: `ruff check` with the repository's ruff.toml finds nothing in MRIHistoReg, Testing, bench and tools.

ruff.toml targets Python 3.9 (Slicer 5.8's Python), so this also catches annotations that 3.9 cannot evaluate
(FA102), next to pyflakes' unused or undefined names (F), syntax errors (E9) and mutable or call defaults (B006,
B008) and cyclomatic complexity above 15 (C901, outside Testing/); no function in MRIHistoReg/ is longer than 80
lines. Each check is also run on a deliberately broken file to show that it can fail.
"""
import json
import subprocess
import sys
from pathlib import Path

from conftest import REPO

RUFF = Path(sys.executable).parent / "ruff"  # pinned in requirements.txt and requirements-slicer-stack.txt
CONFIG = REPO / "ruff.toml"
CHECKED = ("MRIHistoReg", "Testing", "bench", "tools")
MAX_FUNCTION_LINES = 80  # with ruff's max-complexity 15: small functions that read as the pipeline's steps


def _ruff(*args, cwd=REPO):
    assert RUFF.exists(), f"{RUFF} is missing: install the pinned ruff (pip install -r requirements.txt)"
    # --no-cache: leave no .ruff_cache behind in the working tree
    return subprocess.run([str(RUFF), "check", "--config", str(CONFIG), "--no-cache", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_the_repository_is_lint_clean():
    result = _ruff("--output-format", "concise", *CHECKED)
    assert result.returncode == 0, f"ruff found problems (exit {result.returncode}):\n{result.stdout}{result.stderr}"


def test_a_broken_file_is_reported(tmp_path):
    """An unused import (F401) and a PEP 604 annotation without `from __future__ import annotations` (FA102, only
    because ruff.toml's target is Python 3.9) are both found, with the same options as the repository check."""
    broken = tmp_path / "broken.py"
    broken.write_text("import os\n\n\ndef f(x: int | None):\n    return x\n", encoding="utf-8")
    result = _ruff("--output-format", "json", str(broken))
    assert result.returncode == 1, f"exit {result.returncode}:\n{result.stdout}{result.stderr}"
    codes = sorted(finding["code"] for finding in json.loads(result.stdout))
    assert codes == ["F401", "FA102"], codes


def functionsLongerThan(paths, limit=MAX_FUNCTION_LINES):
    import ast

    long = []
    for path in paths:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit:
                long.append(f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    return long


def test_no_product_function_is_longer_than_the_bound(tmp_path):
    assert functionsLongerThan(sorted((REPO / "MRIHistoReg").rglob("*.py"))) == []
    long = tmp_path / "long.py"
    long.write_text("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES, encoding="utf-8")
    assert functionsLongerThan([long]) and not functionsLongerThan([long], limit=MAX_FUNCTION_LINES + 1)


def test_complexity_above_the_bound_is_reported(tmp_path):
    branchy = tmp_path / "MRIHistoReg" / "branchy.py"  # outside Testing/, where the bound applies
    branchy.parent.mkdir()
    branchy.write_text("def f(x):\n" + "".join(f"    if x == {i}:\n        return {i}\n" for i in range(20)),
                       encoding="utf-8")
    result = _ruff("--output-format", "json", str(branchy), cwd=tmp_path)
    assert [finding["code"] for finding in json.loads(result.stdout)] == ["C901"], result.stdout

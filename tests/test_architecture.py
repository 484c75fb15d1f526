"""The structure docs/architecture.md states: functions that read in one screen, and the floors import-linter holds
(the contract itself is in pyproject.toml; `lint-imports` runs it in CI, and here when it is installed)."""

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lmlab"
MAX_LINES = 80
# functions allowed past MAX_LINES, each with the reason docs/architecture.md gives ("Long on purpose")
LONG_ON_PURPOSE: dict[str, str] = {}


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{path.relative_to(PACKAGE.parent).as_posix()}::{node.name}", node.end_lineno - node.lineno + 1


def test_no_function_is_longer_than_a_screen():
    long = {name: lines for name, lines in _functions() if lines > MAX_LINES and name not in LONG_ON_PURPOSE}
    assert not long, f"functions over {MAX_LINES} lines (split them, or say why in docs/architecture.md): {long}"


def test_the_long_functions_listed_are_still_long_and_documented():
    lengths = dict(_functions())
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    for name in LONG_ON_PURPOSE:
        assert lengths.get(name, 0) > MAX_LINES, f"{name} is no longer long: drop it from LONG_ON_PURPOSE"
        assert name.split("::")[1] in doc, f"{name}: docs/architecture.md does not say why it is long"


@pytest.mark.skipif(
    shutil.which("lint-imports") is None and not (PACKAGE.parent / ".venv/bin/lint-imports").exists(),
    reason="import-linter is not installed",
)
def test_imports_keep_to_the_floors():
    exe = shutil.which("lint-imports") or str(PACKAGE.parent / ".venv/bin/lint-imports")
    result = subprocess.run([exe], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def _error_texts(tree: ast.AST):
    """The text of each ``LmlabError(...)`` message in ``tree`` (``x`` for each value formatted in), with its line."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "LmlabError" and node.args:
            message = node.args[0]
            parts = message.values if isinstance(message, ast.JoinedStr) else [message]
            text = "".join(p.value if isinstance(p, ast.Constant) and isinstance(p.value, str) else "x" for p in parts)
            yield node.lineno, text


def test_library_errors_name_parameters_and_leave_flags_to_the_cli():
    """docs/architecture.md, habit 8: a library error names ``max_length``, not ``--max-length`` (the CLI shows
    the flag, from the error's ``params``); a command in backticks (`lmlab prepare --canaries N`) may name flags."""
    import re

    flagged = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name in ("cli.py", "clikit.py"):
            continue
        for line, text in _error_texts(ast.parse(path.read_text())):
            if re.search(r"(?<![\w-])--[a-z]", re.sub(r"`[^`]*`", "", text)):
                flagged.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {text[:60]}")
    assert not flagged, "\n".join(flagged)

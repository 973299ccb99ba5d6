"""No function in src/ longer than 60 lines: past that, a function is doing two jobs."""

from __future__ import annotations

import ast

from conftest import REPO

LIMIT = 60


def test_no_function_is_over_60_lines() -> None:
    long = []
    for path in sorted((REPO / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > LIMIT:
                    long.append(
                        f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines"
                    )
    assert not long, "\n".join(long)

"""The shape of the code: no function of the package is longer than 80 lines (ruff checks
complexity, statements and branches; line counts are checked here). The curvature engine is
exempt while it is being rewritten."""

from __future__ import annotations

import ast
from pathlib import Path

import optbrain

MAX_LINES = 80
ROOT = Path(optbrain.__file__).parent
EXEMPT: tuple[str, ...] = ()
LATER: set[str] = set()  # "path:function" allowed to be longer while it is being split


def test_no_function_is_longer_than_80_lines():
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in EXEMPT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES and f"{rel}:{node.name}" not in LATER:
                    long.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "split these functions:\n" + "\n".join(long)

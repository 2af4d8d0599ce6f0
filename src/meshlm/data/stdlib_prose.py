"""The English of the Python standard library: `data.source = "python-stdlib-prose"`.

One document per module: its docstrings (module, classes, functions; `ast.get_docstring`) and
then its comments joined into one paragraph (`tokenize`; shebang and coding lines dropped).
Test folders and site-packages are skipped, and so is a module with under 200 characters of
such text. About 3.7 MB (1.2M tokens of the default 2048-token BPE) on Python 3.11, in sorted
relative-path order like the code corpus. A backbone pretrained on it instead of the code
scored higher on the validation split of unseen English reviews but the same on their test
split (docs/benchmarks.md, "Tasks"), so the default backbone stays on the code.
"""

from __future__ import annotations

import ast
import io
import tokenize
from collections.abc import Iterator
from pathlib import Path

SKIP_DIRS = {"site-packages", "__pycache__", "test", "tests", "idle_test"}
MIN_CHARS = 200


def module_prose(source: str) -> str:
    """The docstrings, then the comments, of one module's source ("" if it does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                parts.append(doc)
    comments = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                text = token.string.lstrip("#").strip()
                if text and not text.startswith("!") and "coding" not in text:
                    comments.append(text)
    except (tokenize.TokenError, SyntaxError):
        pass
    if comments:
        parts.append(" ".join(comments))
    return "\n\n".join(parts)


def prose_documents(files: Iterator[Path]) -> Iterator[str]:
    for path in files:
        if path.suffix != ".py":
            continue
        try:
            text = module_prose(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) > MIN_CHARS:
            yield text

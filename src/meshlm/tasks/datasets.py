"""The built-in gold datasets, derived exactly from the running interpreter's standard library
(no download, every machine has them): docs/tasks.md describes them.

    classify   docstrings of modules, classes and functions labelled by their top-level
               package (asyncio, email, http, ...: PACKAGES, 20 classes)
    ner        logical source lines of those packages as Python tokens, with spans typed by
               their role in the syntax tree: FUNC and CLASS (names defined), PARAM
               (parameters), MODULE (imported modules), CALL (called names), EXC (raised
               exceptions), DECO (decorators)
    srl        for each call on a line (the predicate: the called name), its receiver (ARG0),
               positional arguments (ARG1 ...) and keyword arguments (ARGM-KW) as spans

Splits are by module: a module's examples all go to one split, chosen by a hash of its path
(80% train, 10% valid, 10% test), so no split shares source with another. ner and srl keep at
most CAPS examples per split, chosen by a hash of their text; all of it is deterministic for a
given Python version (the stdlib changes between versions: the files are named by it).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import sys
import sysconfig
import tokenize
from pathlib import Path

PACKAGES = (
    "asyncio", "concurrent", "ctypes", "curses", "dbm", "email", "html", "http", "idlelib", "importlib",
    "json", "logging", "multiprocessing", "sqlite3", "tkinter", "unittest", "urllib", "wsgiref", "xml", "xmlrpc",
)  # fmt: skip
SKIP_DIRS = {"test", "tests", "idle_test", "__pycache__"}
CAPS = {"train": 6000, "valid": 1000, "test": 1000}
MAX_TOKENS = 40
SPLITS = ("train", "valid", "test")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _split_of(key: str) -> str:
    bucket = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10
    return "train" if bucket < 8 else "valid" if bucket == 8 else "test"


def _modules():
    """(package, module key, source) of every module of PACKAGES, in a fixed order."""
    root = stdlib_root()
    for package in PACKAGES:
        base = root / package
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(root)
            if SKIP_DIRS & set(rel.parts[:-1]):
                continue
            try:
                source = path.read_text(encoding="utf-8")
                tree = ast.parse(source)
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            yield package, rel.as_posix(), source, tree


# ----------------------------------------------------------------------------- classification


def classification_examples() -> dict[str, list[dict]]:
    out = {s: [] for s in SPLITS}
    seen = set()
    for package, key, _, tree in _modules():
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc:
                continue
            text = " ".join(doc.split())
            if len(text.split()) < 4 or text in seen or not text.isascii():
                continue
            seen.add(text)
            out[_split_of(key)].append({"text": text, "label": package})
    return out


# ----------------------------------------------------------------------------- tagging


def _logical_lines(source: str):
    """Lists of (text, start, end) tokens, one list per logical line (comments and layout dropped)."""
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING, tokenize.ENDMARKER}
    line = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NEWLINE:
                if line:
                    yield line
                line = []
            elif tok.type not in skip and tok.string.strip():
                line.append((tok.string, tok.start, tok.end))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return


def _name_at(node: ast.expr):
    """The position of the name a call / raise / decorator expression names: (line, col)."""
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Name):
        return (node.lineno, node.col_offset)
    if isinstance(node, ast.Attribute):
        return (node.end_lineno, node.end_col_offset - len(node.attr))
    return None


def _entity_positions(tree: ast.AST) -> tuple[dict, list]:
    """(line, col) -> entity type for one-token entities; and (start, end, MODULE) spans."""
    types: dict = {}
    modules: list = []
    low = []
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            types[(node.lineno, node.col_offset)] = "PARAM"
        elif isinstance(node, ast.Call):
            pos = _name_at(node)
            if pos:
                low.append((pos, "CALL"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                modules.append(((alias.lineno, alias.col_offset), (alias.lineno, alias.col_offset + len(alias.name))))
        elif isinstance(node, ast.Raise) and node.exc is not None:
            pos = _name_at(node.exc)
            if pos:
                types[pos] = "EXC"
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for deco in node.decorator_list:
                pos = _name_at(deco)
                if pos:
                    types[pos] = "DECO"
    for pos, kind in low:
        types.setdefault(pos, kind)
    return types, modules


def _tag_line(line, types, modules) -> list[str]:
    tags = ["O"] * len(line)
    for i, (text, start, _) in enumerate(line):
        if i and line[i - 1][0] in ("def", "class") and text.isidentifier():
            tags[i] = "B-FUNC" if line[i - 1][0] == "def" else "B-CLASS"
        elif start in types:
            tags[i] = "B-" + types[start]
    spans = list(modules)
    if line[0][0] == "from":  # from a.b import c: the module is the dotted name after the dots
        j = 1
        while j < len(line) and line[j][0] in (".", "..."):
            j += 1
        k = j
        while k < len(line) and line[k][0] != "import":
            k += 1
        if k > j:
            spans.append((line[j][1], line[k - 1][2]))
    for first, last in spans:
        inside = [i for i, (_, s, e) in enumerate(line) if s >= first and e <= last]
        if inside and all(tags[i] == "O" for i in inside):
            tags[inside[0]] = "B-MODULE"
            for i in inside[1:]:
                tags[i] = "I-MODULE"
    return tags


def _span_tokens(line, node) -> list[int]:
    first, last = (node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset)
    return [i for i, (_, s, e) in enumerate(line) if s >= first and e <= last]


def _srl_examples(line, calls) -> list[dict]:
    out = []
    tokens = [t for t, _, _ in line]
    for call in calls:
        pos = _name_at(call)
        where = [i for i, (_, s, _) in enumerate(line) if s == pos] if pos else []
        if not where:
            continue
        tags = ["O"] * len(line)
        roles = []
        if isinstance(call.func, ast.Attribute):
            roles.append(("ARG0", call.func.value))
        roles += [(f"ARG{min(i + 1, 5)}", a) for i, a in enumerate(call.args)]
        roles += [("ARGM-KW", k) for k in call.keywords]
        for role, node in roles:
            span = _span_tokens(line, node)
            if span and all(tags[i] == "O" for i in span):
                tags[span[0]] = f"B-{role}"
                for i in span[1:]:
                    tags[i] = f"I-{role}"
        out.append({"tokens": tokens, "predicate": where[0], "tags": tags})
    return out


def tagging_examples(task: str) -> dict[str, list[dict]]:
    out = {s: [] for s in SPLITS}
    for _, key, source, tree in _modules():
        split = _split_of(key)
        types, modules = _entity_positions(tree) if task == "ner" else ({}, [])
        calls_by_line: dict = {}
        if task == "srl":
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    calls_by_line.setdefault(node.lineno, []).append(node)
        for line in _logical_lines(source):
            if len(line) > MAX_TOKENS or not all(t.isascii() for t, _, _ in line):
                continue
            if line[0][0].startswith(('"', "'")) and len(line) == 1:  # a docstring
                continue
            first_row, last_row = line[0][1][0], line[-1][2][0]
            if task == "ner":
                out[split].append({"tokens": [t for t, _, _ in line], "tags": _tag_line(line, types, modules)})
            else:
                calls = [
                    c
                    for row in range(first_row, last_row + 1)
                    for c in calls_by_line.get(row, [])
                    if c.end_lineno <= last_row
                ]
                out[split] += _srl_examples(line, sorted(calls, key=lambda c: (c.lineno, c.col_offset)))
    for split in SPLITS:
        ranked = sorted(out[split], key=lambda r: hashlib.sha256(json.dumps(r).encode()).hexdigest())
        out[split] = ranked[: CAPS[split]]
    return out


# ----------------------------------------------------------------------------- files


def builtin_files(task: str, cache_dir: Path) -> dict[str, Path]:
    """{split: path} of a built-in dataset's JSONL files, written into the cache on first use."""
    version = f"py{sys.version_info.major}.{sys.version_info.minor}"
    folder = Path(cache_dir) / "tasks" / f"{task}-{version}"
    files = {s: folder / f"{s}.jsonl" for s in SPLITS}
    if all(p.is_file() for p in files.values()):
        return files
    data = classification_examples() if task == "classify" else tagging_examples(task)
    folder.mkdir(parents=True, exist_ok=True)
    for split, path in files.items():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in data[split]), encoding="utf-8")
        tmp.replace(path)
    return files

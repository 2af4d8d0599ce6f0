"""One implementation for the CLI and the API: the API runs the `meshlm` commands themselves.

`run_command(argv, workers)` runs `meshlm predict ...`, `meshlm eval ...` or
`meshlm finetune ...`: with workers=1 in this process (the command's own handler, parsed by
its own parser), with workers=N on N processes through the launcher of `--nproc N`. The
data goes through files (JSONL in, JSONL / JSON out), as on the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import secrets
import time
from collections.abc import Iterable
from pathlib import Path

from meshlm.api.workers import run_workers
from meshlm.config import ConfigError
from meshlm.inference.commands import add_commands as add_inference_commands
from meshlm.tasks.commands import add_commands as add_task_commands


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshlm")
    sub = parser.add_subparsers(dest="command", required=True)
    add_inference_commands(sub)
    add_task_commands(sub)  # after inference: it routes task runs' eval / predict to itself
    return parser


def run_command(argv: list[str], workers: int, quiet: bool = True) -> None:
    """`meshlm <argv>` on `workers` processes (1: here); a worker's error is raised here.
    quiet: the in-process command's printed summary is dropped (its result is in the files)."""
    argv = [str(a) for a in argv]
    if workers == 1:
        args = _parser().parse_args(argv)
        args.argv = argv
        with contextlib.ExitStack() as stack:
            if quiet:
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
                stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
            code = args.func(args)
        if code:
            raise ConfigError(f"`meshlm {' '.join(argv[:1])}` failed (exit code {code}); its output above says why.")
        return
    run_workers(workers, argv)


def write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def texts_file(texts: list[str], folder: Path) -> Path:
    """In-memory texts as a .jsonl corpus ({"text": ...} per line), named by its content so that
    fitting the same texts twice reuses one prepared dataset."""
    if not all(isinstance(t, str) for t in texts):
        bad = next(t for t in texts if not isinstance(t, str))
        raise ConfigError(f"the training texts must all be strings; got {type(bad).__name__} ({bad!r:.60}).")
    if not texts:
        raise ConfigError("got an empty list of texts; pass at least one document (or a path, or 'python-stdlib').")
    digest = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()[:16]
    path = Path(folder).resolve() / f"texts-{digest}.jsonl"
    if not path.is_file():
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        write_jsonl(tmp, ({"text": t} for t in texts))
        tmp.replace(path)
    return path


def unique_run_dir(stem: str, root: Path = Path("runs")) -> Path:
    """runs/<stem>-<date>-<time>-<random>: two models fitted in one folder never collide."""
    while True:
        path = root / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        if not path.exists():
            return path

"""Can meshlm write here? Checked before any work, so that a bad --out or --output fails in a
second with one message instead of after the data is prepared or the model is loaded.

Permission bits are not enough: root ignores them, and a read-only mount or /proc refuses
writes whatever the bits say. So the check creates (and removes) a probe file where the output
will go: in the directory itself when it exists, else in the nearest directory above it that
exists (where the missing ones would be created).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from meshlm.utils.disk import existing_ancestor


def _probe(directory: Path) -> str | None:
    """Why no file can be created in `directory`, or None."""
    try:
        fd, name = tempfile.mkstemp(prefix=".meshlm-write-check-", dir=directory)
    except OSError as e:
        return f"{directory} does not accept new files ({e.strerror})"
    os.close(fd)
    try:
        os.unlink(name)
    except OSError:
        pass
    return None


def output_dir_problem(path: Path) -> str | None:
    """Why `path` cannot be (created and) written as a directory of outputs, or None."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            return f"{path} exists and is not a directory"
        return _probe(path)
    above = existing_ancestor(path)
    if not above.is_dir():
        return f"{path} would be created under {above}, which is a file, not a directory"
    return _probe(above)


def output_file_problem(path: Path) -> str | None:
    """Why `path` cannot be written as a file (created, or replaced by rename), or None."""
    path = Path(path)
    if path.is_dir():
        return f"{path} is a directory, not a file"
    if path.exists() and not path.is_file():
        return f"{path} exists and is not a regular file"
    return output_dir_problem(path.parent if str(path.parent) else Path("."))

"""`python fill_disk_during_save.py N meshlm-args...`: run the `meshlm` command in this process
with one injected fault: just before torch.distributed.checkpoint writes the data of the
checkpoint for step N, the file system holding it is filled (a filler file takes all but 4 KiB),
so the write itself runs out of space (after meshlm's free-space check passed).

The fault is injected from the outside by wrapping torch's FileSystemWriter.write_data; meshlm
has no hook for it.
"""

import os
import shutil
import sys

from torch.distributed.checkpoint import FileSystemWriter

STEP = int(sys.argv[1])
_original_write = FileSystemWriter.write_data


def _fill_then_write(self, plan, planner):
    if f"step-{STEP:06d}" in str(self.path):
        root = self.path
        while not os.path.ismount(root):
            root = os.path.dirname(root)
        free = shutil.disk_usage(root).free
        with open(os.path.join(root, "filler.bin"), "wb") as f:
            f.write(b"\0" * max(free - 4096, 0))
        print(f"filled the disk at {root}", flush=True)
    return _original_write(self, plan, planner)


FileSystemWriter.write_data = _fill_then_write

from meshlm.cli import main  # noqa: E402

sys.exit(main(sys.argv[2:]))

"""`python kill_after_checkpoint_data.py N meshlm-args...`: run the `meshlm` command in this
process with one injected fault: the process SIGKILLs itself right after
torch.distributed.checkpoint has written the data of the checkpoint for step N, before meshlm
writes that checkpoint's manifest and publishes it (a crash in the middle of a save).

The fault is injected from the outside by wrapping torch's `dcp.save`; meshlm has no hook for it.
"""

import os
import signal
import sys

import torch.distributed.checkpoint as dcp

KILL_STEP = int(sys.argv[1])
_original_save = dcp.save


def _save_then_die(state, *args, storage_writer=None, **kwargs):
    result = _original_save(state, *args, storage_writer=storage_writer, **kwargs)
    if f"step-{KILL_STEP:06d}" in str(getattr(storage_writer, "path", "")):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return result


dcp.save = _save_then_die

from meshlm.cli import main  # noqa: E402

sys.exit(main(sys.argv[2:]))

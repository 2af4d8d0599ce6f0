"""`python nan_loss_at_steps.py S meshlm-args...`: run the `meshlm` command in this process with
one injected fault: from training step S (0-based) on, the training loss is NaN (torch's
cross-entropy returns NaN under autograd), as after a numerical blow-up or a bad batch.

The fault is injected from the outside by wrapping torch.nn.functional.cross_entropy and
noting the step of the batch being trained on; meshlm has no hook for it.
"""

import sys

import torch
import torch.nn.functional as F

import meshlm.train.objective as objective_module

FROM_STEP = int(sys.argv[1])
_batch, _loss = objective_module.train_batch, F.cross_entropy
_current = {"step": -1}


def _tracking_batch(data, seq_len, seed, step, ids):
    _current["step"] = step
    return _batch(data, seq_len, seed, step, ids)


def _poisoned(*args, **kwargs):
    value = _loss(*args, **kwargs)
    return value * float("nan") if torch.is_grad_enabled() and _current["step"] >= FROM_STEP else value


objective_module.train_batch = _tracking_batch
F.cross_entropy = _poisoned

from meshlm.cli import main  # noqa: E402

sys.exit(main(sys.argv[2:]))

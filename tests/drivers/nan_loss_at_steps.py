"""`python nan_loss_at_steps.py S meshlm-args...`: run the `meshlm` command in this process with
one injected fault: from training step S (0-based) on, the training loss is NaN (torch's
cross-entropy returns NaN under autograd), as after a numerical blow-up or a bad batch.

The fault is injected from the outside by wrapping torch.nn.functional.cross_entropy and
noting the step the step runner is working on (language modelling and task fine-tuning alike);
meshlm has no hook for it.
"""

import sys

import torch
import torch.nn.functional as F

from meshlm.train.step import StepRunner

FROM_STEP = int(sys.argv[1])
_forward_backward, _loss = StepRunner.forward_backward, F.cross_entropy
_current = {"step": -1}


def _tracking_forward_backward(self, step):
    _current["step"] = step
    return _forward_backward(self, step)


def _poisoned(*args, **kwargs):
    value = _loss(*args, **kwargs)
    return value * float("nan") if torch.is_grad_enabled() and _current["step"] >= FROM_STEP else value


StepRunner.forward_backward = _tracking_forward_backward
F.cross_entropy = _poisoned

from meshlm.cli import main  # noqa: E402

sys.exit(main(sys.argv[2:]))

"""The Python API: `meshlm.LanguageModel`, `meshlm.load`, `meshlm.TextClassifier`,
`meshlm.Tagger`, `meshlm.Layout`, `meshlm.History`, `meshlm.Callback` (see docs/python-api.md).

A thin layer over the commands: fit is `meshlm train` / `meshlm finetune`, predict and
evaluate are `meshlm predict` / `meshlm eval`, and workers=N is `--nproc N` (api/workers.py).
"""

from meshlm.api.history import Callback, History
from meshlm.api.language_model import LanguageModel
from meshlm.api.loading import load
from meshlm.api.options import Layout
from meshlm.api.task_models import Tagger, TextClassifier
from meshlm.api.workers import WorkerError

__all__ = ["Callback", "History", "LanguageModel", "Layout", "Tagger", "TextClassifier", "WorkerError", "load"]

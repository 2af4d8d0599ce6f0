"""`meshlm.load(run_dir)`: a trained model back from its run directory, of the right kind."""

from __future__ import annotations

from pathlib import Path

from meshlm.api.language_model import LanguageModel
from meshlm.api.task_models import load_task_model
from meshlm.config import ConfigError


def load(run_dir: str | Path):
    """A trained model from its run directory: a LanguageModel, or for a fine-tuned task run a
    TextClassifier / Tagger."""
    from meshlm.tasks.config import is_task_run

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(
            f"{run_dir} is not a meshlm run directory (no config.toml); pass what fit() or `meshlm train` wrote."
        )
    if is_task_run(run_dir):
        return load_task_model(run_dir)
    return LanguageModel._from_run(run_dir)

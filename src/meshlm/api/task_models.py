"""`meshlm.TextClassifier` and `meshlm.Tagger`: task models as scikit-learn estimators.

    clf = meshlm.TextClassifier(backbone=lm, epochs=2).fit(texts, labels, workers=2)
    clf.predict(["def f(): ..."])           # -> numpy array of labels
    clf.score(texts, labels)                 # accuracy (a Tagger: span F1)
    cross_val_score(meshlm.TextClassifier(backbone=lm), X, y, cv=3)

They follow scikit-learn's conventions (constructor arguments are the parameters, get_params /
set_params, fit returns self, fitted state ends in "_"), so cross_val_score, GridSearchCV and
Pipeline work with them. fit is `meshlm finetune`, predict `meshlm predict`, score
`meshlm eval` on the task run, through the same commands as the CLI (api/commands.py).
"""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from meshlm.api.commands import read_jsonl, run_command, unique_run_dir, write_jsonl
from meshlm.api.history import History, read_records
from meshlm.api.options import check_workers, overrides_from, parallel_overrides, toml_override
from meshlm.config import ConfigError, DataConfig
from meshlm.tasks.config import load_task_config


class _TaskModel:
    """What TextClassifier and Tagger share; `task` is "classify", "ner" or "srl"."""

    task = "classify"

    # ------------------------------------------------------------------ scikit-learn protocol

    @classmethod
    def _param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any):
        for name, value in params.items():
            if name not in self._param_names():
                raise ValueError(
                    f"{type(self).__name__} has no parameter '{name}'; its parameters: {', '.join(self._param_names())}."
                )
            setattr(self, name, value)
        return self

    def __sklearn_tags__(self):
        """What scikit-learn asks of an estimator (1.6+; imported only when scikit-learn asks):
        texts or word lists in, labels or tag lists out, no numeric validation."""
        from sklearn.utils import ClassifierTags, InputTags, Tags, TargetTags

        classifier = self.task == "classify"
        return Tags(
            estimator_type="classifier" if classifier else None,
            target_tags=TargetTags(required=True),
            classifier_tags=ClassifierTags() if classifier else None,
            no_validation=True,
            input_tags=InputTags(one_d_array=True, two_d_array=False, string=True),
        )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items() if v is not None)
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ records

    def _record(self, x: Any, y: Any = None) -> dict:
        raise NotImplementedError

    def _answer(self, record: dict) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ fit / predict / score

    def _backbone_run(self, cache_dir: str) -> Path:
        from meshlm.api.language_model import LanguageModel
        from meshlm.tasks.finetune import backbone_run

        if isinstance(self.backbone, LanguageModel):
            return self.backbone._require_run()
        if self.backbone is not None and not isinstance(self.backbone, (str, Path)):
            raise ConfigError(
                f"backbone= takes a fitted meshlm.LanguageModel, a run directory or None (the default backbone), "
                f"got {type(self.backbone).__name__}."
            )
        return backbone_run(str(self.backbone) if self.backbone else None, None, cache_dir).resolve()

    def _overrides(self) -> list[str]:
        layout, auto = parallel_overrides(self.parallel)
        if auto:
            raise ConfigError('parallel="auto" is not offered for fine-tuning; pass a meshlm.Layout(...).')
        items = overrides_from(self.overrides, {}) + layout + ["train.progress=false"]
        if self.steps is not None:
            items += ["task.epochs=0", toml_override("train.steps", self.steps)]
        elif self.epochs is not None:
            items.append(toml_override("task.epochs", self.epochs))
        return items

    def fit(self, X, y, validation_data: tuple | None = None, workers: int | None = None):
        """Fine-tune on (X, y) (`meshlm finetune`); returns self. validation_data=(X_val, y_val)
        picks the kept model (best validation score); without it every tenth example is held out."""
        from meshlm.tasks.finetune import finetune_config

        workers = check_workers(self.workers if workers is None else workers)
        X, y = list(X), list(y)
        if len(X) != len(y) or not X:
            raise ConfigError(
                f"fit needs as many labels as inputs (at least one): got {len(X)} inputs, {len(y)} labels."
            )
        if validation_data is None:
            held = set(range(9, len(X), 10)) or {len(X) - 1}
            train = [(x, t) for i, (x, t) in enumerate(zip(X, y)) if i not in held or len(X) == 1]
            valid = [(X[i], y[i]) for i in sorted(held)]
        else:
            train, valid = list(zip(X, y)), list(zip(*validation_data))
        overrides = self._overrides()
        self._labels = {str(t): t for t in y} | {str(t): t for _, t in valid}
        out = Path(self.run_dir) if self.run_dir else unique_run_dir(f"{self.task}")
        with tempfile.TemporaryDirectory(prefix="meshlm-finetune-") as tmp:
            train_file = write_jsonl(Path(tmp) / "train.jsonl", (self._record(x, t) for x, t in train))
            valid_file = write_jsonl(Path(tmp) / "valid.jsonl", (self._record(x, t) for x, t in valid))
            backbone = self._backbone_run(DataConfig().cache_dir)
            finetune_config(self.task, train_file, backbone, overrides, world_size=workers)  # errors before launch
            argv = ["finetune", "--task", self.task, "--train", train_file, "--valid", valid_file, "--from", backbone]
            argv += ["--out", out.resolve()] + [a for o in overrides for a in ("--set", o)]
            run_command(argv, workers)
        self._set_fitted(out)
        return self

    def _set_fitted(self, run: Path) -> None:
        self.run_dir_ = Path(run)
        cfg = load_task_config(self.run_dir_ / "config.toml")
        labels = getattr(self, "_labels", {})
        self.classes_ = np.array([labels.get(lab, lab) for lab in cfg.task.labels], dtype=object)
        self.history_ = History(read_records(self.run_dir_ / "metrics.jsonl"), self.run_dir_)

    def _require_fitted(self) -> Path:
        if getattr(self, "run_dir_", None) is None:
            raise ConfigError(f"this {type(self).__name__} is not fitted yet: call fit(X, y) or meshlm.load(RUN_DIR).")
        return self.run_dir_.resolve()

    def predict(self, X, workers: int | None = None) -> np.ndarray:
        """Predictions in input order (`meshlm predict` on the task run): labels, or tag lists."""
        workers = check_workers(self.workers if workers is None else workers)
        run = self._require_fitted()
        X = list(X)
        if not X:
            return np.array([], dtype=object)
        with tempfile.TemporaryDirectory(prefix="meshlm-predict-") as tmp:
            inp = write_jsonl(Path(tmp) / "in.jsonl", (self._record(x) for x in X))
            outp = Path(tmp) / "out.jsonl"
            run_command(["predict", "--run", run, "--input", inp, "--output", outp], workers)
            records = sorted(read_jsonl(outp), key=lambda r: r["line"])
        errors = [r["error"] for r in records if "error" in r]
        if errors:
            raise ConfigError(f"predict: {len(errors)} input(s) could not be run; the first: {errors[0]}")
        answers = np.empty(len(records), dtype=object)
        answers[:] = [self._answer(r) for r in records]
        return answers

    def score(self, X, y, workers: int | None = None) -> float:
        """Accuracy (TextClassifier) or span F1 (Tagger) on labelled data (`meshlm eval`)."""
        workers = check_workers(self.workers if workers is None else workers)
        run = self._require_fitted()
        with tempfile.TemporaryDirectory(prefix="meshlm-score-") as tmp:
            data = write_jsonl(Path(tmp) / "data.jsonl", (self._record(x, t) for x, t in zip(X, y)))
            result = Path(tmp) / "score.json"
            run_command(["eval", "--run", run, "--data", data, "--output", result], workers)
            scores = read_jsonl(result)[0]
        return float(scores["accuracy"] if "accuracy" in scores else scores["f1"])


class TextClassifier(_TaskModel):
    """A text classifier over a language model backbone (mean-pooled scores + a linear head).

    backbone: a fitted meshlm.LanguageModel, a run directory, or None (meshlm's default
    backbone, trained once and cached). epochs (or steps) of fine-tuning (default: meshlm
    finetune's, 4 epochs or more for a small classification set); workers processes
    and parallel=meshlm.Layout(...) as in LanguageModel.fit; overrides: dotted config keys
    ({"train.lr": 1e-3, "task.pooling": "last"})."""

    task = "classify"

    def __init__(
        self,
        backbone=None,
        epochs: float | None = None,
        steps: int | None = None,
        workers: int = 1,
        parallel=None,
        overrides=None,
        run_dir=None,
    ):
        self.backbone, self.epochs, self.steps, self.workers = backbone, epochs, steps, workers
        self.parallel, self.overrides, self.run_dir = parallel, overrides, run_dir

    def _record(self, x, y=None) -> dict:
        if not isinstance(x, str):
            raise ConfigError(f"TextClassifier inputs are strings, got {type(x).__name__} ({x!r:.60}).")
        return {"text": x} if y is None else {"text": x, "label": str(y)}

    def _answer(self, record: dict):
        labels = getattr(self, "_labels", {})
        return labels.get(record["label"], record["label"])


class Tagger(_TaskModel):
    """A token tagger (task="ner": IOB tags per word; task="srl": X items are (tokens,
    predicate index) pairs and the tags are the predicate's arguments). Inputs are lists of
    words, labels lists of tags; the options are TextClassifier's (overrides={"task.crf": True}
    adds a CRF layer)."""

    def __init__(
        self,
        task: str = "ner",
        backbone=None,
        epochs: float | None = None,
        steps: int | None = None,
        workers: int = 1,
        parallel=None,
        overrides=None,
        run_dir=None,
    ):
        self.task, self.backbone, self.epochs, self.steps, self.workers = task, backbone, epochs, steps, workers
        self.parallel, self.overrides, self.run_dir = parallel, overrides, run_dir

    def fit(self, X, y, validation_data: tuple | None = None, workers: int | None = None):
        if self.task not in ("ner", "srl"):
            raise ConfigError(
                f'Tagger(task=...) must be "ner" or "srl", got {self.task!r}; use TextClassifier to classify.'
            )
        return super().fit(X, [list(tags) for tags in y], validation_data, workers)

    def _record(self, x, y=None) -> dict:
        if self.task == "srl":
            if not (isinstance(x, (tuple, list)) and len(x) == 2 and isinstance(x[1], int)):
                raise ConfigError(f"srl inputs are (tokens, predicate_index) pairs, got {x!r:.80}.")
            record = {"tokens": list(x[0]), "predicate": x[1]}
        else:
            record = {"tokens": list(x)}
        if y is not None:
            record["tags"] = [str(t) for t in y]
        return record

    def _answer(self, record: dict):
        return list(record["tags"])


def load_task_model(run_dir: Path) -> _TaskModel:
    """A fitted TextClassifier / Tagger from a task run directory (meshlm.load)."""
    task = load_task_config(Path(run_dir) / "config.toml").task.name
    model = TextClassifier() if task == "classify" else Tagger(task=task)
    model._set_fitted(Path(run_dir))
    return model

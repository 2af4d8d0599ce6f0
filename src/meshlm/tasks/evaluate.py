"""Scoring a task model on labelled data: `meshlm eval --run TASK_RUN --data FILE [--json]`.

Classification: accuracy, macro-F1 and per-label scores, and a confusion-matrix PNG.
Tagging (ner, srl): entity-level precision, recall and F1, micro-averaged and per type, equal to
seqeval's on the predicted tags (which are the tags `meshlm predict` writes). The scores go to
the run directory: eval_<data file stem>.json, per_type_<stem>.md and (classification)
confusion_<stem>.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from meshlm.artifacts.run_dir import write_text_atomic
from meshlm.tasks.encoding import words_of
from meshlm.tasks.formats import read_examples
from meshlm.tasks.metrics import (
    classification_scores,
    confusion,
    entity_types,
    per_type_table,
    plot_confusion,
    span_counts,
    span_scores,
)
from meshlm.tasks.predict import TaskModelRun, predict_sharded
from meshlm.tasks.schemes import to_iob2


def evaluate_file(loaded: TaskModelRun, data: Path | str, rank: int = 0, world: int = 1) -> dict | None:
    """The scores of the run's model on a labelled file (every rank calls it; rank 0 gets them).
    A label the model was not trained on is an error naming the file and line."""
    task, labels = loaded.task, loaded.cfg.task.labels
    examples = None
    if rank == 0:
        examples, _ = read_examples(data, task)
        known = set(labels)
        from meshlm.tasks.formats import DataError

        for e in examples:
            unseen = [e.label] if task == "classify" else [t for t in e.tags if t not in known]
            if unseen and unseen[0] not in known:
                raise DataError(
                    f"{data} line {e.line}: label {unseen[0]!r} was not seen in training (the model knows: "
                    f"{', '.join(labels[:30])})."
                )
    if world > 1:
        box = [examples]
        dist.broadcast_object_list(box, src=0)
        examples = box[0]
    records = predict_sharded(loaded, examples, rank, world)
    if rank != 0:
        return None
    if task == "classify":
        index = {name: i for i, name in enumerate(labels)}
        conf = confusion([index[e.label] for e in examples], [index[r["label"]] for r in records], len(labels))
        scores = classification_scores(conf, labels)
        scores["confusion"] = conf.tolist()
    else:
        types = entity_types(labels)
        gold = [e.tags if e.tags is not None else ["O"] * len(words_of(e.text or "")) for e in examples]
        pred = [to_iob2(r["tags"], loaded.cfg.task.scheme) for r in records]
        scores = span_scores(span_counts(gold, pred, types), types)
    scores["task"], scores["data"] = task, str(data)
    return scores


def write_eval_files(run: Path | str, scores: dict, labels: list[str]) -> list[Path]:
    run = Path(run)
    stem = Path(scores["data"]).stem
    paths = [run / f"eval_{stem}.json", run / f"per_type_{stem}.md"]
    write_text_atomic(paths[0], json.dumps(scores, indent=1) + "\n")
    write_text_atomic(paths[1], per_type_table(scores))
    if "confusion" in scores:
        paths.append(run / f"confusion_{stem}.png")
        plot_confusion(scores["confusion"], labels, paths[-1])
    return paths


def headline(scores: dict) -> dict:
    """The scores `--json` prints: accuracy and macro_f1, or precision, recall and f1."""
    keys = ("accuracy", "macro_f1") if "accuracy" in scores else ("precision", "recall", "f1")
    return {"task": scores["task"], **{k: scores[k] for k in keys}}

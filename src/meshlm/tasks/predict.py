"""Prediction with a task model: in Python (`predict_examples`), and over files
(`meshlm predict --run TASK_RUN --input IN.jsonl --output OUT.jsonl [--nproc N]`).

Input lines: {"text"} (classify, ner), {"tokens"} (ner), {"tokens", "predicate"} (srl); an "id"
is copied to the output. Output, one record per input line, in input order:

    {"line": 3, "label": "email", "scores": {"email": 0.91, ...}}     classify
    {"line": 4, "tags": ["B-PER", "I-PER", "O"], "tokens": [...]}     ner, srl (the run's scheme)
    {"line": 5, "error": "line 5: ..."}                               a line that cannot be read

Resumable: records are appended as each chunk finishes; a re-run skips the lines OUT already
answers and tries error lines again; at the end OUT is rewritten in input order.

Several processes: rank 0 reads the input and hands each chunk out in contiguous shares; the
ranks run the model on fixed-shape batches (an example's scores do not depend on its batch
or its rank), and rank 0 writes. `--nproc 2` therefore writes what `--nproc 1` writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from meshlm.artifacts.weights_file import load_weights
from meshlm.config import ConfigError
from meshlm.data.tokenizer import load_tokenizer
from meshlm.tasks.config import TaskRunConfig, is_task_run, load_task_config
from meshlm.tasks.encoding import encode
from meshlm.tasks.formats import Example, parse_record
from meshlm.tasks.objective import decode_tags, pooled_scores
from meshlm.tasks.schemes import get_entities, tags_from_spans
from meshlm.tasks.spec import task_model_config

BATCH = 16  # rows per forward: fixed, so that results do not depend on how the input is split
CHUNK = 256  # lines handed out and written at a time


@dataclass
class TaskModelRun:
    cfg: TaskRunConfig
    model: torch.nn.Module
    tokenizer: object

    @property
    def task(self) -> str:
        return self.cfg.task.name


def load_task_model(run: Path | str, device: torch.device | str = "cpu", verify: bool = True) -> TaskModelRun:
    """The task model of `run`; its weights are checked against their manifest (the sha256
    only when `verify`) and must be finite."""
    run = Path(run)
    if not is_task_run(run):
        raise ConfigError(
            f"{run} is not a task model run directory (no [task] in its config.toml); see `meshlm finetune`."
        )
    cfg = load_task_config(run / "config.toml")
    model = load_weights(run / "model.safetensors", task_model_config(cfg), device, verify=verify).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return TaskModelRun(cfg, model, load_tokenizer(run / "tokenizer.json"))


@torch.no_grad()
def predict_examples(loaded: TaskModelRun, examples: list[Example], batch_size: int = BATCH) -> list[dict]:
    """One record per example: {"label", "scores"} or {"tags"} (IOB2-normalised, in the run's
    scheme; words past the model's length get "O")."""
    cfg, model = loaded.cfg, loaded.model
    labels = cfg.task.labels
    enc = encode(
        [Example(e.line, e.text, None, e.tokens, None, e.predicate) for e in examples],
        loaded.tokenizer,
        cfg.task.name,
        labels,
        cfg.data.seq_len,
        cfg.task.pooling,
    )
    device = next(model.parameters()).device
    records: list[dict] = []
    for first in range(0, len(examples), batch_size):
        idx = np.arange(first, min(first + batch_size, len(examples)))
        x = np.repeat(enc.x[idx[:1]], batch_size, axis=0)  # fixed shape: pad with copies of a row
        x[: len(idx)] = enc.x[idx]
        out = model(torch.from_numpy(x).to(device)).float()[: len(idx)]
        if cfg.task.name == "classify":
            weights = torch.zeros(len(idx), x.shape[1], dtype=torch.bool, device=device)
            for row, i in enumerate(idx):
                n = enc.lengths[i]
                if cfg.task.pooling == "last":
                    weights[row, n - 1] = True
                else:
                    weights[row, :n] = True
            probs = torch.softmax(pooled_scores(out, weights), dim=-1).cpu()
            for row in range(len(idx)):
                p = probs[row]
                records.append(
                    {"label": labels[int(p.argmax())], "scores": {lab: round(float(v), 6) for lab, v in zip(labels, p)}}
                )
            continue
        mask = torch.zeros(len(idx), x.shape[1], dtype=torch.bool, device=device)
        for row, i in enumerate(idx):
            mask[row, enc.starts[i]] = True
        predicted = decode_tags(out, mask, cfg.task.crf)
        for row, i in enumerate(idx):
            tags = [labels[t] for t in predicted[row]] + ["O"] * (enc.n_words[i] - len(predicted[row]))
            records.append({"tags": tags_from_spans(get_entities(tags), len(tags), cfg.task.scheme)})
    return records


def token_counts(loaded: TaskModelRun, examples: list[Example]) -> list[int]:
    """The tokens the model reads per example (after truncation to the run's length)."""
    cfg = loaded.cfg
    enc = encode(examples, loaded.tokenizer, cfg.task.name, cfg.task.labels, cfg.data.seq_len, cfg.task.pooling)
    return list(enc.lengths)


# ----------------------------------------------------------------------------- files


@dataclass
class PredictSummary:
    answered: int
    skipped: int
    errors: int
    output: Path


def read_inputs(path: Path, task: str) -> list[tuple[int, Example | str, dict]]:
    """(line, Example or error message, fields to echo) per non-blank input line."""
    items = []
    for number, text in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
            if not isinstance(obj, dict):
                raise ValueError("expected a JSON object")
            example = parse_record(obj, task, False, lambda msg: ValueError(msg), number)
            items.append((number, example, {"id": obj["id"]} if "id" in obj else {}))
        except (ValueError, json.JSONDecodeError) as e:
            items.append((number, f"line {number}: {e}", {}))
    return items


def _answered(output: Path) -> dict[int, dict]:
    done = {}
    if output.is_file():
        for text in output.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("line"), int) and "error" not in rec:
                done[rec["line"]] = rec
    return done


def _share(items: list, rank: int, world: int) -> list:
    per = -(-len(items) // world)
    return items[rank * per : (rank + 1) * per]


def predict_file(loaded: TaskModelRun, input_path, output_path, rank: int = 0, world: int = 1) -> PredictSummary | None:
    """Every rank calls this (rank 0 with the paths); rank 0 returns the summary."""
    distributed = world > 1
    main = rank == 0
    items = read_inputs(Path(input_path), loaded.task) if main else None
    done = _answered(Path(output_path)) if main else {}
    todo = [it for it in items if it[0] not in done] if main else None
    if distributed:
        box = [todo]
        dist.broadcast_object_list(box, src=0)
        todo = box[0]
    records: dict[int, dict] = dict(done)
    errors = 0
    out_file = open(output_path, "a", encoding="utf-8") if main else None
    try:
        for first in range(0, len(todo), CHUNK):
            chunk = todo[first : first + CHUNK]
            mine = [it for it in _share(chunk, rank, world) if isinstance(it[1], Example)]
            results = list(zip([it[0] for it in mine], predict_examples(loaded, [it[1] for it in mine])))
            if distributed:
                gathered = [None] * world if main else None
                dist.gather_object(results, gathered, dst=0)
                results = [r for part in (gathered or []) for r in part]
            if not main:
                continue
            by_line = dict(results)
            for number, example, echo in chunk:
                rec = {"line": number, **echo}
                if isinstance(example, str):
                    rec["error"] = example
                    errors += 1
                else:
                    rec.update(by_line[number])
                    if loaded.task != "classify" and example.tokens is None:
                        from meshlm.tasks.encoding import words_of

                        rec["tokens"] = words_of(example.text or "")
                records[number] = rec
                out_file.write(json.dumps(rec) + "\n")
            out_file.flush()
    finally:
        if out_file is not None:
            out_file.close()
    if not main:
        return None
    tmp = Path(str(output_path) + ".tmp")
    try:  # the rewrite in input order never leaves its temporary file behind
        tmp.write_text("".join(json.dumps(records[n]) + "\n" for n in sorted(records)), encoding="utf-8")
        tmp.replace(output_path)
    finally:
        tmp.unlink(missing_ok=True)
    return PredictSummary(len(todo) - errors, len(done), errors, Path(output_path))


def predict_sharded(loaded: TaskModelRun, examples: list[Example], rank: int = 0, world: int = 1) -> list[dict] | None:
    """predict_examples over `world` ranks (contiguous shares); the records, in order, on rank 0."""
    mine = predict_examples(loaded, _share(examples, rank, world))
    if world == 1:
        return mine
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return [r for part in gathered for r in part] if rank == 0 else None

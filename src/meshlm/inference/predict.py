"""Batch prediction over a JSONL file: `meshlm predict --input IN.jsonl --output OUT.jsonl`.

Input: one JSON object per line,

    {"prompt": "def fib(n):", "max_new_tokens": 64, "temperature": 0, "stop": ["\\n\\n"], "id": "q1"}

"prompt" is required; the sampling fields (max_new_tokens, temperature, top_k, top_p,
repetition_penalty, seed, stop) override the command line's defaults; "id" and "meta" are
copied to the output. Blank lines are skipped.

Output: one object per answered input line, in input order,

    {"line": 1, "id": "q1", "prompt": ..., "text": ..., "prompt_tokens": 5,
     "completion_tokens": 17, "finish_reason": "stop"}

or {"line": 3, "error": "line 3: ..."} for a line that cannot be run (bad JSON, a missing or
unknown field, a bad value, a prompt longer than the context); the others still run.

Resumable: records are appended as each chunk of prompts finishes, and a re-run skips the
lines that OUT already answers (same line number and prompt); error lines are tried again.
At the end OUT is rewritten in input order. What changes an answer (the model, the generation
settings) is recorded in OUT.settings.json, and a re-run with anything else is refused instead
of mixing answers (predict_settings.py; --overwrite starts over).

Layout: world = dp x tp processes; global rank 0 reads and writes the files and hands each
chunk out round-robin to the dp groups; every rank of a group runs the same schedule.
Without a per-line seed, a line's seed is derived from --seed and its line number, so the
output does not depend on the layout.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from meshlm.inference.engine import Engine, Request
from meshlm.inference.loading import InferenceLayout, broadcast_object
from meshlm.inference.predict_settings import check_same_settings, write_settings
from meshlm.inference.sampling import SamplingParams

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed", "stop")
ECHO_KEYS = ("id", "meta")
ACCEPTED_KEYS = ("prompt", *SAMPLING_KEYS, *ECHO_KEYS)


@dataclass
class Item:
    line: int
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    echo: dict[str, Any]


@dataclass
class PredictSummary:
    answered: int
    skipped: int
    errors: int
    output: Path


def line_seed(base_seed: int | None, line: int) -> int | None:
    if base_seed is None:
        return None
    return (base_seed * 1_000_003 + line) % (1 << 63)


def parse_line(
    number: int, text: str, tokenizer, defaults: SamplingParams, base_seed: int | None, check: Callable[[Request], None]
) -> Item:
    """One input line -> Item; ValueError with a message that starts with the line number."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"line {number}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f'line {number}: expected a JSON object with a "prompt", got {type(obj).__name__}')
    unknown = sorted(set(obj) - set(ACCEPTED_KEYS))
    if "prompt" not in obj:
        hint = (
            f" ({', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not a field: a generation "
            f'model continues a "prompt"; rename the field)'
            if unknown
            else ""
        )
        raise ValueError(f'line {number}: the "prompt" is missing{hint}; accepted fields: {", ".join(ACCEPTED_KEYS)}')
    if unknown:
        raise ValueError(
            f"line {number}: unknown field(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(ACCEPTED_KEYS)}"
        )
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError(f'line {number}: "prompt" must be a string, got {type(prompt).__name__}')
    fields = {k: obj[k] for k in SAMPLING_KEYS if k in obj}
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    if isinstance(fields.get("stop"), list):
        fields["stop"] = tuple(fields["stop"])
    if "seed" not in fields:
        fields["seed"] = line_seed(base_seed, number)
    try:
        params = dataclasses.replace(defaults, **fields)
    except (ValueError, TypeError) as e:
        raise ValueError(f"line {number}: {e}") from None
    ids = tokenizer.encode(prompt).ids
    try:
        check(Request(ids, params))
    except ValueError as e:
        raise ValueError(f"line {number}: {e}") from None
    return Item(number, prompt, ids, params, {k: obj[k] for k in ECHO_KEYS if k in obj})


def read_answered(output: Path) -> dict[int, dict]:
    """Successful records already in OUT, by line (a torn last line from a crash is ignored)."""
    done: dict[int, dict] = {}
    if not output.is_file():
        return done
    for text in output.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("line"), int) and "error" not in rec and "text" in rec:
            done[rec["line"]] = rec
    return done


def _write_all(path: Path, records: dict[int, dict]) -> None:
    """OUT rewritten in line order, through a temporary file that never outlives a failure."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in sorted(records):
                f.write(json.dumps(records[line], ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def run_predict(
    input_path: Path | None,
    output_path: Path | None,
    engine: Engine,
    layout: InferenceLayout,
    defaults: SamplingParams,
    base_seed: int | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
    settings: dict | None = None,
    start_over: bool = False,
) -> PredictSummary | None:
    """Every rank calls this; only global rank 0 passes the paths and gets the summary.
    `settings` (what changes an answer: predict_settings.py) are recorded beside OUT; answers
    made with others are refused unless `start_over`, which discards them."""
    main = layout.is_main
    chunk_size = chunk_size or 2 * engine.max_batch * layout.dp
    records: dict[int, dict] = {}
    pending: list[Item] = []
    skipped = errors = 0
    if main:
        input_path, output_path = Path(input_path), Path(output_path)
        if settings is not None:
            if start_over:
                output_path.unlink(missing_ok=True)
            else:
                check_same_settings(output_path, settings)
            output_path.parent.mkdir(parents=True, exist_ok=True)
            write_settings(output_path, settings)
        answered = read_answered(output_path)
        with open(input_path, encoding="utf-8") as f:
            for number, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    item = parse_line(number, text, engine.tokenizer, defaults, base_seed, engine.check)
                except ValueError as e:
                    records[number] = {"line": number, "error": str(e)}
                    errors += 1
                    continue
                old = answered.get(number)
                if old is not None and old.get("prompt") == item.prompt:
                    records[number] = old
                    skipped += 1
                else:
                    pending.append(item)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        _write_all(output_path, records)  # kept answers and this run's error lines, before any work
    bar = None
    if main and progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), unit="prompt", desc="predict", dynamic_ncols=True)
    out = open(output_path, "a", encoding="utf-8") if main else None
    try:
        position = 0
        while True:
            chunk = None
            if main and position < len(pending):
                chunk = [(it.line, it.prompt_ids, it.params) for it in pending[position : position + chunk_size]]
            chunk = broadcast_object(chunk, layout)
            if chunk is None:
                break
            mine = chunk[layout.dp_rank :: layout.dp]
            completions = engine.generate([Request(ids, params) for _, ids, params in mine])
            results = [(line, c) for (line, _, _), c in zip(mine, completions)] if layout.tp_rank == 0 else []
            if layout.env.world_size > 1:
                gathered = [None] * layout.env.world_size if main else None
                dist.gather_object(results, gathered, dst=0)
                results = [r for part in gathered for r in part] if main else []
            if main:
                by_line = {it.line: it for it in pending[position : position + chunk_size]}
                for line, c in sorted(results, key=lambda r: r[0]):
                    item = by_line[line]
                    rec = {
                        "line": line,
                        **item.echo,
                        "prompt": item.prompt,
                        "text": c.text,
                        "prompt_tokens": c.prompt_tokens,
                        "completion_tokens": c.completion_tokens,
                        "finish_reason": c.finish_reason,
                    }
                    records[line] = rec
                    out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                out.flush()
                if bar is not None:
                    bar.update(len(chunk))
                position += len(chunk)
    finally:
        if out is not None:
            out.close()
        if bar is not None:
            bar.close()
    if not main:
        return None
    _write_all(output_path, records)  # input order
    return PredictSummary(len(pending), skipped, errors, output_path)

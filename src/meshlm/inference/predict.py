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

Resumable: each record is appended as its answer finishes, and a re-run skips the lines that
OUT already answers (same line number and prompt); error lines are tried again. At the end OUT
is rewritten in input order. What changes an answer (the model, the generation settings) is
recorded in OUT.settings.json, and a re-run with anything else is refused instead of mixing
answers (predict_settings.py; --overwrite starts over).

Layout: world = dp x tp processes; global rank 0 reads and writes the files. Prompts are handed
out on demand (distributed/work_queue.py): each dp group asks for as many prompts as its engine
has free slots and streams them through continuous batching, so a finished answer's slot takes
the next prompt at once, and a group that drew long answers takes fewer (longest first, so no
long answer starts last). Every rank of a group runs the same schedule. An answer depends only
on its prompt, parameters and seed, never on which prompts share its batch or its group;
without a per-line seed, a line's seed is derived from --seed and its line number, so the
output does not depend on the layout or on the timing.
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

from meshlm.distributed.work_queue import open_work_queue
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


def _by_cost(items: list[Item]) -> list[Item]:
    """The order work is handed out in: the longest answers first (at most max_new_tokens, plus
    the prompt), so that no long answer starts last and keeps one worker busy alone at the end
    (longest processing time first); ties in input order. The output order is not affected."""
    return sorted(items, key=lambda it: (-(it.params.max_new_tokens + len(it.prompt_ids) / 8), it.line))


def run_predict(
    input_path: Path | None,
    output_path: Path | None,
    engine: Engine,
    layout: InferenceLayout,
    defaults: SamplingParams,
    base_seed: int | None = None,
    progress: bool = True,
    settings: dict | None = None,
    start_over: bool = False,
) -> PredictSummary | None:
    """Every rank calls this; only global rank 0 passes the paths and gets the summary.
    `settings` (what changes an answer: predict_settings.py) are recorded beside OUT; answers
    made with others are refused unless `start_over`, which discards them."""
    main = layout.is_main
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
    # Every rank sizes its cache for the longest answer up front: a long request admitted later
    # never waits for the engine to drain before the cache can grow.
    need = broadcast_object(max((len(it.prompt_ids) + it.params.max_new_tokens for it in pending), default=1), layout)
    engine.reserve(engine.max_batch, need)
    bar = None
    if main and progress:
        from tqdm import tqdm

        bar = tqdm(total=len(pending), unit="prompt", desc="predict", dynamic_ncols=True)
    out = open(output_path, "a", encoding="utf-8") if main else None
    by_line = {it.line: it for it in pending}

    def record(results: list[tuple[int, dict]]) -> None:  # rank 0, as answers finish anywhere
        for line, answer in results:
            item = by_line[line]
            rec = {"line": line, **item.echo, "prompt": item.prompt, **answer}
            records[line] = rec
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        out.flush()
        if bar is not None:
            bar.update(len(results))

    try:
        work = [(it.line, it.prompt_ids, it.params) for it in _by_cost(pending)] if main else None
        answer_on_demand(engine, layout, work, record)
    finally:
        if out is not None:
            out.close()
        if bar is not None:
            bar.close()
    if not main:
        return None
    _write_all(output_path, records)  # input order
    return PredictSummary(len(pending), skipped, errors, output_path)


def answer_on_demand(engine: Engine, layout: InferenceLayout, work: list | None, record: Callable) -> None:
    """Run `work` [(line, prompt ids, params)] (rank 0's list) through every data-parallel group's
    engine, handed out on demand: a group asks for as many prompts as it has free slots, so a
    finished answer's slot takes the next prompt at the following step; `record` gets
    [(line, answer fields)] on rank 0 as answers finish. The ranks of a tensor-parallel group
    add the same requests between the same steps: its leader (tp rank 0) receives the prompts
    and passes them on."""
    leaders = [d * layout.tp for d in range(layout.dp)]
    queue = open_work_queue(work, leaders, record)
    client = queue.client
    lines: dict[int, int] = {}  # engine request id -> input line
    finished: list[tuple[int, dict]] = []
    exhausted = False
    while True:
        free = engine.max_batch - engine.num_running - engine.num_waiting
        if not exhausted and (free > 0 or not engine.has_work):
            new: list = []
            if client is not None:
                client.top_up(free)
                if not engine.has_work:
                    client.wait()  # idle: until a prompt arrives or none is left
                new, exhausted = client.take(max(free, 0)), client.exhausted
            if layout.tp_group is not None:  # the group's leader tells its other ranks
                new, exhausted = _from_leader((new, exhausted), layout)
            for line, ids, params in new:
                lines[engine.add(Request(ids, params))] = line
        if not engine.has_work:
            if exhausted:
                break
            continue
        for event in engine.step():
            c = event.completion
            if c is not None:
                line = lines.pop(event.index)
                if client is not None:
                    finished.append((line, _answer_fields(c)))
        if finished:
            client.put(finished)
            finished = []
    queue.close()


def _answer_fields(c) -> dict:
    return {
        "text": c.text,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "finish_reason": c.finish_reason,
    }


def _from_leader(value, layout: InferenceLayout):
    """The tp group leader's `value` on every rank of the group."""
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(layout.tp_group, 0), group=layout.tp_group)
    return box[0]

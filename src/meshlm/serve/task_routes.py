"""The task-model routes: POST /v1/classify (classify runs) and POST /v1/tag (ner, srl runs).

    /v1/classify  {"model"?, "input": str | [str]}
                  -> {"object": "list", "data": [{"index", "label", "scores"}], "model", "usage"}
    /v1/tag       {"model"?, "input": str | [str]} or {"tokens": [[str, ...], ...]},
                  plus "predicate": int | [int] (srl: the predicate's word index per input)
                  -> {"object": "list", "data": [{"index", "tokens", "tags"}], "model", "usage"}

Inputs are read by the same code as `meshlm predict`'s input lines (tasks.formats.parse_record)
and answered by the same `predict_examples`, so an answer equals what `meshlm predict --run`
writes for that input. A route of the other kind of run (text generation on a task run, a task
route on a language-model run, /v1/tag on a classifier) answers 400 naming the route to use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict

from meshlm.serve.engine_bridge import EngineUnavailable, QueueFull
from meshlm.serve.protocol import APIError, at_capacity, bad_request, check_model, unavailable
from meshlm.serve.task_bridge import TaskBridge
from meshlm.tasks.encoding import words_of
from meshlm.tasks.formats import Example, parse_record

ROUTE = {"classify": "/v1/classify", "ner": "/v1/tag", "srl": "/v1/tag"}
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize")


@dataclass
class TaskServeState:
    """What the task routes (and the shared /v1/models, /health, /metrics) need."""

    bridge: TaskBridge
    task: str  # classify, ner or srl
    model_name: str
    max_model_len: int  # the run's sequence length: longer inputs are truncated, as by predict
    created: int
    retry_after_s: int = 1


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | list[str]


class TagRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    input: str | list[str] | None = None
    tokens: list[list[str]] | None = None
    predicate: int | list[int] | None = None


task_router = APIRouter()


def _wrong_kind(path: str, state) -> APIError:
    if isinstance(state, TaskServeState):
        use = ROUTE[state.task]
        what = f"the {state.task} task model '{state.model_name}'"
        if path in GENERATION_ROUTES:
            what += ", which does not generate text"
    else:
        use = "/v1/completions or /v1/chat/completions"
        what = (
            f"the language model '{state.model_name}' (classify and tag are served for task runs made by "
            f"`meshlm finetune`)"
        )
    return APIError(
        400, f"POST {path} is not served here: this server serves {what}. Use POST {use}.", code="wrong_endpoint"
    )


def _task_state(task_kinds: tuple[str, ...], path: str):
    """A dependency: the state, if this server's run answers `path`; else a 400 naming the
    route to use (checked before the body is validated)."""

    def check(request: Request) -> TaskServeState:
        state = request.app.state.serve
        if not isinstance(state, TaskServeState) or state.task not in task_kinds:
            raise _wrong_kind(path, state)
        return state

    return check


ClassifierState = Annotated[TaskServeState, Depends(_task_state(("classify",), "/v1/classify"))]
TaggerState = Annotated[TaskServeState, Depends(_task_state(("ner", "srl"), "/v1/tag"))]


def add_wrong_kind_routes(app, paths: tuple[str, ...]) -> None:
    """POST `paths` answer 400 naming the route this server's run has."""
    for path in paths:

        async def wrong(request: Request, path: str = path):
            raise _wrong_kind(path, request.app.state.serve)

        app.add_api_route(path, wrong, methods=["POST"], include_in_schema=False)


def _as_list(value, param: str) -> list:
    items = [value] if isinstance(value, (str, int)) else list(value)
    if not items:
        raise bad_request(f"'{param}' is empty; send at least one input.", param)
    return items


def _examples(state: TaskServeState, records: list[dict], param: str) -> list[Example]:
    def error(i: int):
        return lambda msg: bad_request(f"{param}[{i}]: {msg}", param)

    out = []
    for i, obj in enumerate(records):
        text = obj.get("text")
        if text is not None and not text.strip():
            raise bad_request(f"{param}[{i}] is empty; send some text.", param)
        out.append(parse_record(obj, state.task, False, error(i), i + 1))
    return out


async def _predict(state: TaskServeState, examples: list[Example]) -> tuple[list[dict], list[int]]:
    bridge = state.bridge
    if len(examples) > bridge.capacity():
        raise bad_request(
            f"{len(examples)} inputs in one request; this server takes at most {bridge.capacity()} at a time "
            f"(--max-batch + --max-queued). Split the request.",
            "input",
        )
    try:
        return await bridge.predict(examples)
    except QueueFull:
        raise at_capacity(bridge.capacity(), "inputs", state.retry_after_s) from None
    except EngineUnavailable as e:
        raise unavailable("the model", e) from None


def _response(state: TaskServeState, data: list[dict], counts: list[int]) -> dict:
    n = sum(counts)
    return {"object": "list", "data": data, "model": state.model_name, "usage": {"prompt_tokens": n, "total_tokens": n}}


@task_router.post("/v1/classify")
async def classify(body: ClassifyRequest, state: ClassifierState) -> dict:
    check_model(state.model_name, body.model)
    examples = _examples(state, [{"text": t} for t in _as_list(body.input, "input")], "input")
    records, counts = await _predict(state, examples)
    return _response(state, [{"index": i, **r} for i, r in enumerate(records)], counts)


@task_router.post("/v1/tag")
async def tag(body: TagRequest, state: TaggerState) -> dict:
    check_model(state.model_name, body.model)
    if (body.input is None) == (body.tokens is None):
        raise bad_request("send either 'input' (text) or 'tokens' (lists of words), not both or neither.", "input")
    param = "input" if body.input is not None else "tokens"
    words = [words_of(t) for t in _as_list(body.input, param)] if body.input is not None else body.tokens
    empty = [i for i, w in enumerate(words) if not w]
    if empty and body.input is not None:
        raise bad_request(f"input[{empty[0]}] has no words; send some text.", "input")
    if not words:
        raise bad_request("'tokens' is empty; send at least one list of words.", "tokens")
    records = [{"tokens": w} for w in words]
    if state.task == "srl":
        if body.predicate is None:
            raise bad_request(
                "an srl model needs 'predicate': the index of the predicate word, one per input.", "predicate"
            )
        predicates = _as_list(body.predicate, "predicate")
        if len(predicates) != len(records):
            raise bad_request(
                f"{len(records)} inputs but {len(predicates)} predicates; send one per input.", "predicate"
            )
        for rec, p in zip(records, predicates):
            rec["predicate"] = p
    elif body.predicate is not None:
        raise bad_request("'predicate' is for srl models; this one tags named entities (ner).", "predicate")
    examples = _examples(state, records, param)
    results, counts = await _predict(state, examples)
    data = [{"index": i, "tokens": w, "tags": r["tags"]} for i, (w, r) in enumerate(zip(words, results))]
    return _response(state, data, counts)

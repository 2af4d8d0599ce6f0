"""The HTTP routes: OpenAI's completions, chat completions and models, plus /health,
/metrics, /tokenize and /detokenize.

Every route is a thin layer: validate (protocol.py), turn the request into engine sequences
(one per prompt and choice), submit them through the bridge, and shape the engine's tokens
into OpenAI's response or stream chunks (openai_format.py). `router` holds the language-model
routes; `common_router` (/v1/models, /health, /metrics) serves task models too, whose routes
(/v1/classify, /v1/tag) are in task_routes.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from meshlm.inference.sampling import SamplingParams
from meshlm.serve.chat_template import ChatTemplate
from meshlm.serve.engine_bridge import EngineBridge, EngineUnavailable, QueueFull, RequestHandle, SequenceSpec
from meshlm.serve.openai_format import ChatFormatter, CompletionFormatter, Formatter
from meshlm.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    at_capacity,
    bad_request,
    check_model,
    unavailable,
)
from meshlm.serve.streaming import EventStreamResponse, until_disconnected


@dataclass
class ServeState:
    """What the routes need, built once by app.py."""

    bridge: EngineBridge
    tokenizer: object  # tokenizers.Tokenizer
    chat_template: ChatTemplate
    # Encodes rendered chat prompts: for a Hugging Face template, one that maps the special
    # tokens the template writes (<|eot_id|>, </s>, ...) to their ids, as transformers does.
    chat_tokenizer: object
    model_name: str
    max_model_len: int
    vocab_size: int
    eos_token_id: int | None  # the end-of-text token generation stops at (None: the tokenizer has none)
    created: int
    retry_after_s: int = 1


router = APIRouter()
common_router = APIRouter()  # every kind of run: the state needs bridge, model_name, created, max_model_len


def _state(request: Request) -> ServeState:
    return request.app.state.serve


# ----------------------------------------------------------------------------- building requests


def _check_ids(state: ServeState, ids: list[int], param: str) -> None:
    bad = [t for t in ids if not 0 <= t < state.vocab_size]
    if bad:
        raise bad_request(f"token id {bad[0]} is outside the vocabulary (0 .. {state.vocab_size - 1}).", param)


def _token_budget(state: ServeState, n_prompt: int, requested: int | None, explicit: bool) -> int:
    """max_tokens, checked against the context: an explicit request that does not fit is a
    400 (as OpenAI answers); a default is cut to what fits."""
    room = state.max_model_len - max(n_prompt, 1)
    if room <= 0:
        raise bad_request(
            f"this model's maximum context length is {state.max_model_len} tokens, and the prompt has "
            f"{n_prompt}; shorten the prompt.",
            "prompt" if requested is not None else "messages",
            "context_length_exceeded",
        )
    if requested is None:
        return room
    if requested > room and explicit:
        raise bad_request(
            f"this model's maximum context length is {state.max_model_len} tokens; you asked for "
            f"{n_prompt + requested} ({n_prompt} in the prompt, {requested} to generate). Lower max_tokens "
            f"or shorten the prompt.",
            "max_tokens",
            "context_length_exceeded",
        )
    return min(requested, room)


def _params(state: ServeState, req, max_tokens: int, choice: int) -> SamplingParams:
    try:
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            repetition_penalty=req.repetition_penalty,
            seed=None if req.seed is None else req.seed + choice,  # choice i: seed + i
            stop=tuple(req.stop or ()),
            stop_token_ids=() if req.ignore_eos or state.eos_token_id is None else (state.eos_token_id,),
        )
    except ValueError as e:
        raise bad_request(f"{e}.") from None


def _submit(state: ServeState, specs: list[SequenceSpec]) -> RequestHandle:
    try:
        return state.bridge.submit(specs)
    except QueueFull:
        state.bridge.metrics.outcomes["rejected"] += 1
        raise at_capacity(state.bridge.capacity(), "sequences", state.retry_after_s) from None
    except EngineUnavailable as e:
        raise unavailable("the engine", e) from None


# ----------------------------------------------------------------------------- responses


async def _respond(request: Request, handle: RequestHandle, fmt: Formatter, stream: bool) -> Response:
    if stream:
        return EventStreamResponse(_sse(handle, fmt), on_close=handle.abort)
    try:
        result = await until_disconnected(request, _collect(handle, fmt))
    finally:
        handle.abort()  # no-op once finished; frees the slots of a client that left
    if result is None:  # the client hung up
        return Response(status_code=499)
    return JSONResponse(result)


async def _collect(handle: RequestHandle, fmt: Formatter) -> dict:
    try:
        async for token in handle:
            fmt.add(token)
    except EngineUnavailable as e:
        raise APIError(
            503, f"the engine failed while running the request: {e}.", "service_unavailable", code="engine_dead"
        ) from None
    except ValueError as e:
        raise bad_request(f"{e}.") from None
    return fmt.response()


async def _sse(handle: RequestHandle, fmt: Formatter) -> AsyncIterator[bytes]:
    for chunk in fmt.opening_chunks():
        yield _event(chunk)
    try:
        async for token in handle:
            for chunk in fmt.chunks(token):
                yield _event(chunk)
    except (EngineUnavailable, ValueError) as e:
        # The status line is sent already: report in the stream, in the error shape.
        err = APIError(
            503, f"the engine failed while running the request: {e}.", "service_unavailable", code="engine_dead"
        )
        yield _event(err.body())
        return
    if fmt.include_usage:
        yield _event(fmt.usage_chunk())
    yield b"data: [DONE]\n\n"


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


# ----------------------------------------------------------------------------- OpenAI routes


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = _state(request)
    check_model(state.model_name, body.model)
    if body.echo and body.logprobs is not None:
        raise bad_request("echo together with logprobs (prompt log-probabilities) is not supported by meshlm.", "echo")
    prompts = body.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    tok = state.tokenizer
    encoded: list[list[int]] = []
    for p in prompts:
        if isinstance(p, str):
            encoded.append(tok.encode(p).ids)
        else:
            _check_ids(state, p, "prompt")
            encoded.append(list(p))
    explicit = "max_tokens" in body.model_fields_set
    specs = []
    for ids in encoded:
        budget = _token_budget(state, len(ids), body.max_tokens, explicit)
        specs += [SequenceSpec(ids, _params(state, body, budget, j), body.logprobs) for j in range(body.n)]
    echo = [tok.decode(ids, skip_special_tokens=False) if body.echo else "" for ids in encoded]
    handle = _submit(state, specs)
    fmt = CompletionFormatter(state, body, [max(len(ids), 1) for ids in encoded], echo)
    return await _respond(request, handle, fmt, body.stream)


def _render_chat(state: ServeState, messages, add_generation_prompt: bool = True) -> list[int]:
    try:
        text = state.chat_template.render(
            [{"role": m.role, "content": m.text()} for m in messages], add_generation_prompt
        )
    except ValueError as e:
        raise bad_request(f"{e}.", "messages") from None
    # The template writes any special tokens itself (as transformers' apply_chat_template).
    return state.chat_tokenizer.encode(text, add_special_tokens=False).ids


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = _state(request)
    check_model(state.model_name, body.model)
    ids = _render_chat(state, body.messages)
    budget = _token_budget(state, len(ids), body.token_limit, True)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    handle = _submit(state, [SequenceSpec(ids, _params(state, body, budget, j), logprobs) for j in range(body.n)])
    fmt = ChatFormatter(state, body, max(len(ids), 1))
    return await _respond(request, handle, fmt, body.stream)


@common_router.get("/v1/models")
async def models(request: Request) -> ModelList:
    state = _state(request)
    return ModelList(data=[ModelCard(id=state.model_name, created=state.created, max_model_len=state.max_model_len)])


# ----------------------------------------------------------------------------- server routes


@common_router.get("/health")
async def health(request: Request) -> Response:
    bridge = _state(request).bridge
    if bridge.healthy:
        return JSONResponse({"status": "ok", "replicas": len(bridge.replicas)})
    return JSONResponse({"status": "unhealthy", "reason": bridge.failure or "engine stopped"}, status_code=503)


@common_router.get("/metrics")
async def metrics(request: Request) -> Response:
    bridge = _state(request).bridge
    running, waiting = bridge.load()
    live = len(bridge.live())
    text = bridge.metrics.render(running, waiting, live * bridge.settings.max_batch, live)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    state = _state(request)
    check_model(state.model_name, body.model)
    if body.messages is not None:
        ids = _render_chat(state, body.messages, body.add_generation_prompt)
    else:
        ids = state.tokenizer.encode(body.prompt).ids
    return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    state = _state(request)
    check_model(state.model_name, body.model)
    _check_ids(state, body.tokens, "tokens")
    return {"prompt": state.tokenizer.decode(body.tokens, skip_special_tokens=False)}

"""The FastAPI application: routes, the API key check, and every error in OpenAI's shape.

    app = build_app(state, api_key="sk-...")   # state: routes.ServeState or task_routes.TaskServeState

A language model gets the generation routes, a task model the task routes; /v1/models,
/health and /metrics serve both, and the other kind's routes answer 400 naming the right one.

The engine bridge is attached to the server's event loop at startup and its workers are
stopped at shutdown (after uvicorn has drained the in-flight requests).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import traceback
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from meshlm.serve.protocol import APIError, validation_message
from meshlm.serve.routes import ServeState, common_router, router
from meshlm.serve.task_routes import GENERATION_ROUTES, TaskServeState, add_wrong_kind_routes, task_router

# Routes open without the API key (a load balancer's health check carries none).
OPEN_PATHS = frozenset({"/health"})


class APIKeyMiddleware:
    """401 in OpenAI's shape unless `Authorization: Bearer <key>` matches (every route but
    OPEN_PATHS). Plain ASGI, so streamed responses pass through untouched."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        err = APIError(
            401,
            "missing or wrong API key: send it as 'Authorization: Bearer <key>' (the server's --api-key or MESHLM_API_KEY).",
            "authentication_error",
            code="invalid_api_key",
        )
        body = json.dumps(err.body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def build_app(state: ServeState | TaskServeState, api_key: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.bridge.attach(asyncio.get_running_loop())
        yield
        state.bridge.shutdown()

    app = FastAPI(title="meshlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    app.include_router(common_router)
    app.include_router(task_router)  # its routes answer 400 unless the run is a task model of their kind
    if isinstance(state, TaskServeState):
        add_wrong_kind_routes(app, GENERATION_ROUTES)
    else:
        app.include_router(router)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()))
        return _error_response(APIError(400, message, "invalid_request_error", param))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}.", kind))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        traceback.print_exception(exc)  # a bug: the operator needs the traceback, the client gets one line
        return _error_response(APIError(500, f"internal error: {exc!r}.", "server_error"))

    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    return app

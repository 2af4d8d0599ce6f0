"""Running the app under uvicorn, with a graceful stop on SIGTERM.

SIGTERM (a container or service manager stopping the server): stop accepting connections,
let the in-flight requests finish for up to `drain_timeout_s` (streams included; those still
running then are cancelled, which aborts their sequences), stop the engine workers, exit 0.
Ctrl-C (SIGINT) does the same but ends with the usual interrupted exit.
"""

from __future__ import annotations

import signal

import uvicorn

KEEP_ALIVE_S = 30


class _Server(uvicorn.Server):
    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM:
            # A requested stop, not a failure: drain as usual but do not re-raise the signal
            # afterwards (uvicorn would, and the process would end with 143 instead of 0).
            self.should_exit = True
            return
        super().handle_exit(sig, frame)


def serve_app(app, host: str, port: int, drain_timeout_s: float, log_level: str = "warning") -> None:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=drain_timeout_s,
        # Longer than clients keep idle connections (httpx, and so the openai client: 5 s), so
        # the server never closes one just as a client sends a request on it.
        timeout_keep_alive=KEEP_ALIVE_S,
        lifespan="on",
        access_log=False,
    )
    _Server(config).run()

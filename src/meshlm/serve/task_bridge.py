"""Running a task model (classify, ner, srl) behind the server.

A task model answers in one forward pass, with no cache and nothing to batch continuously,
so the engine workers of a language model do not fit it. The server process loads the model
itself and runs `meshlm.tasks.predict.predict_examples` (what `meshlm predict` runs) on one
worker thread, one request at a time: torch's own threads parallelise each forward, and a
request's answer never depends on what else is in flight (the library pads to fixed shapes).

Admission is bounded as for language models: at most `max_batch + max_queued` inputs may be
in flight or waiting; beyond that a request is refused (HTTP 429) before anything is queued.

It offers what the shared routes (/health, /metrics) and the app's lifespan ask of a bridge.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from meshlm.serve.engine_bridge import EngineUnavailable, QueueFull
from meshlm.serve.metrics import ServerMetrics
from meshlm.tasks.formats import Example
from meshlm.tasks.predict import TaskModelRun, predict_examples, token_counts


@dataclass(frozen=True)
class TaskBridgeSettings:
    max_batch: int  # inputs counted as running at once (the forward's batch, for /metrics)
    max_queued: int


class TaskBridge:
    def __init__(self, loaded: TaskModelRun, settings: TaskBridgeSettings):
        self.loaded, self.settings = loaded, settings
        self.metrics = ServerMetrics()
        self.replicas = [0]  # one in-process worker
        self.failure: str | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pending = 0  # inputs admitted and not yet answered
        self._running = 0  # inputs in the forward now (set by the worker thread)

    # ------------------------------------------------------------------ lifecycle (the app's lifespan)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="task-model")

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    # ------------------------------------------------------------------ what /health and /metrics read

    @property
    def healthy(self) -> bool:
        return self._executor is not None

    def live(self) -> list[int]:
        return self.replicas if self.healthy else []

    def load(self) -> tuple[int, int]:
        running = min(self._running, self._pending)
        return running, self._pending - running

    def capacity(self) -> int:
        return self.settings.max_batch + self.settings.max_queued

    # ------------------------------------------------------------------ requests (event loop)

    async def predict(self, examples: list[Example]) -> tuple[list[dict], list[int]]:
        """(records as `predict_examples` gives them, tokens read per example). Raises
        QueueFull before anything is queued when the server is at capacity."""
        if self._executor is None:
            raise EngineUnavailable("the task model is not running")
        if self._pending + len(examples) > self.capacity():
            self.metrics.outcomes["rejected"] += 1
            raise QueueFull()
        arrival = time.monotonic()
        self._pending += len(examples)
        try:
            loop = asyncio.get_running_loop()
            records, counts = await loop.run_in_executor(self._executor, self._run, examples)
        except asyncio.CancelledError:  # the client left; the forward itself runs to its end
            self.metrics.outcomes["aborted"] += 1
            raise
        except Exception:
            self.metrics.outcomes["failed"] += 1
            raise
        finally:
            self._pending -= len(examples)
        self.metrics.outcomes["stop"] += 1
        self.metrics.prompt_tokens += sum(counts)
        self.metrics.e2e.observe(time.monotonic() - arrival)
        return records, counts

    def _run(self, examples: list[Example]) -> tuple[list[dict], list[int]]:
        self._running = len(examples)
        try:
            return predict_examples(self.loaded, examples), token_counts(self.loaded, examples)
        finally:
            self._running = 0

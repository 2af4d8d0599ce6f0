"""Between the asyncio front and the engine processes.

The front owns R replicas (engine groups of tp ranks each, see `serve.worker`), started as
multiprocessing 'spawn' children of the server process: the server is one long-lived
process that must own its workers (to see them die, and to take them down with it), which
torch.distributed.run's agent, built for batch jobs it supervises to the end, does not fit.
Each replica's rank 0 is reached over a pipe that the event loop itself reads (add_reader)
and writes: no thread hand-off between an engine step and the HTTP responses, which on a
busy machine costs a scheduling delay per hop. A watchdog thread notices a dead process:
its replica is marked dead, the rest of its ranks are killed (none may hang in a
collective), and the requests it held fail at once (HTTP 503).

Admission: a request of k sequences (n choices per prompt) is placed on the least-loaded
live replicas (fewest sequences, then fewest tokens left) if at most
`replicas x max_batch + max_queued` sequences would then be in flight; otherwise it is
refused (HTTP 429) before anything is queued.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from meshlm.config import ConfigError
from meshlm.inference.sampling import SamplingParams
from meshlm.serve.metrics import ServerMetrics
from meshlm.serve.worker import WorkerSpec, worker_main


def _free_port() -> int:
    """A free TCP port on 127.0.0.1 for a replica's process-group rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class QueueFull(Exception):
    """Too many sequences in flight: answer 429."""


class EngineUnavailable(Exception):
    """No live replica, or the replica holding the request died: answer 503."""


@dataclass(frozen=True)
class BridgeSettings:
    run_dir: str
    dtype: str = "float32"
    quantize: str = "none"
    max_batch: int = 16
    max_model_len: int = 0
    tp: int = 1
    replicas: int = 1
    max_queued: int = 64
    threads: int = 1
    startup_timeout_s: float = 900.0


@dataclass
class Token:
    """One event of one sequence, as the routes see it."""

    choice: int
    token_id: int | None
    text: str
    logprobs: tuple[float, list[tuple[int, float]]] | None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class SequenceSpec:
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None = None


@dataclass
class _Seq:
    fid: int
    choice: int
    replica: _Replica
    tokens_left: int
    handle: RequestHandle
    started: bool = False


class RequestHandle:
    """The sequences of one HTTP request: iterate to get their Tokens (all choices interleaved);
    `abort()` cancels what is still running. Raises EngineUnavailable if a replica dies."""

    def __init__(self, bridge: EngineBridge):
        self.bridge = bridge
        self.queue: asyncio.Queue = asyncio.Queue()
        self.seqs: dict[int, _Seq] = {}
        self.arrival = time.monotonic()
        self.first_token_at: float | None = None
        self.outcome: str | None = None

    def __aiter__(self) -> AsyncIterator[Token]:
        return self._events()

    async def _events(self) -> AsyncIterator[Token]:
        while self.seqs or not self.queue.empty():
            item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            yield item

    def abort(self) -> None:
        self.bridge._abort(self)


@dataclass
class _Replica:
    index: int
    procs: list
    conn: object
    alive: bool = True
    seqs: dict[int, _Seq] = field(default_factory=dict)
    tokens: int = 0  # prompt + output tokens still to come, over its sequences
    running: int = 0  # as last reported by the replica
    waiting: int = 0


class EngineBridge:
    def __init__(self, settings: BridgeSettings):
        self.settings = settings
        self.replicas: list[_Replica] = []
        self.metrics = ServerMetrics()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._next_fid = 0
        self._stopping = False
        self.failure: str | None = None  # why a replica died, for /health

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Spawn every replica's processes (they load the model meanwhile: see `wait_ready`)."""
        s = self.settings
        ctx = mp.get_context("spawn")
        for r in range(s.replicas):
            front_end, worker_end = ctx.Pipe(duplex=True)
            spec = WorkerSpec(
                s.run_dir, s.dtype, s.quantize, s.max_batch, s.max_model_len, s.tp, r, _free_port(), s.threads
            )
            procs = []
            for tp_rank in range(s.tp):
                conn = worker_end if tp_rank == 0 else None
                p = ctx.Process(
                    target=worker_main,
                    args=(spec, tp_rank, conn, os.getpid()),
                    name=f"meshlm-engine-r{r}-tp{tp_rank}",
                    daemon=True,
                )
                p.start()
                procs.append(p)
            worker_end.close()
            self.replicas.append(_Replica(r, procs, front_end))

    def wait_ready(self) -> None:
        """Wait until every replica has loaded its model (blocking). A worker that fails to
        start stops everything and raises ConfigError with its reason."""
        s = self.settings
        deadline = time.monotonic() + s.startup_timeout_s
        for rep in self.replicas:
            while True:
                dead = [p for p in rep.procs if p.exitcode is not None]
                if rep.conn.poll(0.2):
                    try:
                        msg = rep.conn.recv()
                    except EOFError:
                        msg = ("fatal", "the engine worker exited during startup")
                    if msg[0] == "ready":
                        break
                    self.shutdown()
                    raise ConfigError(f"{msg[1]}. Its output above says more.")
                if dead or time.monotonic() > deadline:
                    self.shutdown()
                    why = f"exited with {dead[0].exitcode}" if dead else f"was not ready in {s.startup_timeout_s:.0f} s"
                    raise ConfigError(f"engine replica {rep.index} {why} during startup; its output above says why.")

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the replicas' pipes on `loop` (events are handled there) and start the watchdog."""
        self.loop = loop
        for rep in self.replicas:
            loop.add_reader(rep.conn.fileno(), self._readable, rep)
        threading.Thread(target=self._watchdog, daemon=True, name="engine-watchdog").start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop every worker: a stop message, then terminate, then kill. Never leaves one behind."""
        self._stopping = True
        for rep in self.replicas:
            self._unwatch(rep)
            if rep.alive:
                self._send(rep, ("stop",))
        deadline = time.monotonic() + timeout_s
        procs = [p for rep in self.replicas for p in rep.procs]
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)
        for rep in self.replicas:
            rep.alive = False

    # ------------------------------------------------------------------ state

    @property
    def healthy(self) -> bool:
        return bool(self.replicas) and all(r.alive for r in self.replicas)

    def live(self) -> list[_Replica]:
        return [r for r in self.replicas if r.alive]

    def load(self) -> tuple[int, int]:
        """(running, waiting) sequences over the live replicas. Waiting counts the front's
        sequences not yet admitted by an engine as well as the engines' own queues."""
        running = waiting = 0
        for r in self.live():
            running += r.running
            waiting += max(len(r.seqs) - r.running, 0)
        return running, waiting

    def capacity(self) -> int:
        return len(self.live()) * self.settings.max_batch + self.settings.max_queued

    # ------------------------------------------------------------------ requests (event loop)

    def submit(self, specs: list[SequenceSpec]) -> RequestHandle:
        """Queue the sequences of one request (choice i = specs[i]). Raises QueueFull or
        EngineUnavailable before anything is queued."""
        live = self.live()
        if not live:
            raise EngineUnavailable(self.failure or "no engine replica is running")
        if sum(len(r.seqs) for r in live) + len(specs) > self.capacity():
            raise QueueFull()
        handle = RequestHandle(self)
        for choice, spec in enumerate(specs):
            rep = min(live, key=lambda r: (len(r.seqs), r.tokens))
            fid = self._next_fid
            self._next_fid += 1
            cost = len(spec.prompt_ids) + spec.params.max_new_tokens
            seq = _Seq(fid, choice, rep, cost, handle)
            rep.seqs[fid] = seq
            rep.tokens += cost
            handle.seqs[fid] = seq
            self._send(rep, ("add", fid, spec.prompt_ids, spec.params, spec.logprobs))
        return handle

    def _abort(self, handle: RequestHandle) -> None:
        for fid, seq in list(handle.seqs.items()):
            self._forget(seq)
            if seq.replica.alive:
                self._send(seq.replica, ("abort", fid))
        handle.seqs.clear()
        self._finish_request(handle, "aborted")

    def _forget(self, seq: _Seq) -> None:
        rep = seq.replica
        if rep.seqs.pop(seq.fid, None) is not None:
            rep.tokens -= seq.tokens_left
        seq.handle.seqs.pop(seq.fid, None)

    def _finish_request(self, handle: RequestHandle, outcome: str) -> None:
        if handle.outcome is not None:
            return
        handle.outcome = outcome
        self.metrics.outcomes[outcome] += 1
        if outcome in ("stop", "length"):
            self.metrics.e2e.observe(time.monotonic() - handle.arrival)

    def _on_step(self, rep: _Replica, events: list[tuple], running: int, waiting: int) -> None:
        rep.running, rep.waiting = running, waiting
        now = time.monotonic()
        m = self.metrics
        for fid, token_id, text, logprobs, finish in events:
            seq = rep.seqs.get(fid)
            if seq is None:  # aborted meanwhile
                continue
            handle = seq.handle
            if token_id is not None:
                m.generation_tokens += 1
                seq.tokens_left -= 1
                rep.tokens -= 1
                if handle.first_token_at is None:
                    handle.first_token_at = now
                    m.ttft.observe(now - handle.arrival)
            token = Token(seq.choice, token_id, text, logprobs)
            if finish is not None:
                token.finish_reason, token.prompt_tokens, token.completion_tokens = finish
                m.prompt_tokens += token.prompt_tokens
                self._forget(seq)
                if not handle.seqs:
                    self._finish_request(handle, token.finish_reason)
            handle.queue.put_nowait(token)

    def _on_rejected(self, rep: _Replica, fid: int, message: str) -> None:
        seq = rep.seqs.get(fid)
        if seq is not None:
            handle = seq.handle
            self._abort(handle)
            handle.queue.put_nowait(ValueError(message))

    def _on_replica_dead(self, rep: _Replica, why: str) -> None:
        if not rep.alive or self._stopping:
            return
        rep.alive = False
        self.failure = why
        for p in rep.procs:  # a rank blocked in a collective with a dead peer must not linger
            if p.is_alive():
                p.kill()
        error = EngineUnavailable(why)
        for seq in list(rep.seqs.values()):
            handle = seq.handle
            self._forget(seq)
            self._finish_request(handle, "failed")
            handle.queue.put_nowait(error)
        rep.running = rep.waiting = 0
        self._unwatch(rep)

    # ------------------------------------------------------------------ pipes and the watchdog

    def _send(self, rep: _Replica, msg: tuple) -> None:
        """To a replica's rank 0 (small messages: rank 0 drains its pipe before every step)."""
        try:
            rep.conn.send(msg)
        except (OSError, ValueError):  # gone: the reader or the watchdog reports it
            pass

    def _unwatch(self, rep: _Replica) -> None:
        if self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.remove_reader(rep.conn.fileno())
            except (OSError, ValueError, RuntimeError):
                pass

    def _readable(self, rep: _Replica) -> None:
        """The replica's pipe has data: handle every whole message in it (on the event loop)."""
        try:
            while rep.conn.poll():
                msg = rep.conn.recv()
                kind = msg[0]
                if kind == "step":
                    self._on_step(rep, *msg[1:])
                elif kind == "rejected":
                    self._on_rejected(rep, *msg[1:])
                elif kind == "fatal":
                    self._on_replica_dead(rep, msg[1])
        except (EOFError, OSError):
            self._unwatch(rep)
            self._on_replica_dead(rep, f"engine replica {rep.index} exited")

    def _post(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is exiting
            pass

    def _watchdog(self) -> None:
        while not self._stopping:
            for rep in self.replicas:
                if rep.alive and any(p.exitcode is not None for p in rep.procs):
                    codes = ", ".join(f"{p.name}: {p.exitcode}" for p in rep.procs if p.exitcode is not None)
                    self._post(self._on_replica_dead, rep, f"engine replica {rep.index} died ({codes})")
            time.sleep(0.25)

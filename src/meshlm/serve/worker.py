"""The engine processes behind the server: one engine group (a replica) of `tp` ranks.

Rank 0 of a replica talks to the front over a pipe. Every loop it collects what arrived
(requests to add, ids to abort), hands that list to its tensor-parallel peers (one
`broadcast_object_list` over the replica's own process group), applies it to its engine
and runs one engine step; the peers apply the same list and run the same step, so all
ranks of the replica follow one schedule (see `meshlm.inference.engine`). Rank 0 sends the
step's events back to the front, together with the replica's load (running, waiting).

An idle rank 0 still broadcasts an empty list every second: the peers, blocked in that
broadcast, never reach the process group's timeout however long the server sits idle.

Messages, front -> rank 0: ("add", id, prompt_ids, SamplingParams, logprobs | None),
("abort", id), ("stop",). Rank 0 -> front: ("ready",), ("step", events, running, waiting),
("rejected", id, message), ("fatal", message). An event is (id, token_id, text, logprobs,
finish) with logprobs (logprob, [(token_id, logprob), ...]) or None and finish
(reason, prompt_tokens, completion_tokens) or None.

No orphans: each worker asks the kernel to kill it when the front dies (Linux
PR_SET_PDEATHSIG); a closed pipe also stops rank 0, and rank 0's exit stops its peers.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from dataclasses import dataclass

IDLE_HEARTBEAT_S = 1.0


@dataclass(frozen=True)
class WorkerSpec:
    run_dir: str
    dtype: str
    quantize: str  # "none" or "int8" (inference/quantize)
    max_batch: int
    max_model_len: int
    tp: int
    replica: int
    port: int  # the replica's process-group rendezvous port on 127.0.0.1 (tp > 1)
    threads: int  # torch threads per rank


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the front) exits, however it exits."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def worker_main(spec: WorkerSpec, tp_rank: int, conn, parent_pid: int) -> None:
    """Entry point of one engine rank (a multiprocessing 'spawn' child)."""
    _die_with_parent()
    if os.getppid() != parent_pid:  # the front died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the front decides
    # The launch variables torchrun would set for this replica's own world of tp ranks; read
    # back, as by every meshlm command, through distributed.env.
    os.environ.update(
        {
            "RANK": str(tp_rank),
            "LOCAL_RANK": str(spec.replica * spec.tp + tp_rank),  # one GPU per rank, if there are GPUs
            "WORLD_SIZE": str(spec.tp),
            "LOCAL_WORLD_SIZE": str(spec.tp),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(spec.port),
        }
    )
    try:
        _serve_engine(spec, tp_rank, conn)
    except BaseException as e:  # report, then leave without a traceback storm
        if conn is not None:
            try:
                conn.send(("fatal", f"engine worker (replica {spec.replica}, tp rank {tp_rank}) failed: {e!r}"))
            except OSError:
                pass
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo's threads may abort a normal interpreter teardown


def _serve_engine(spec: WorkerSpec, tp_rank: int, conn) -> None:
    import torch

    from meshlm.distributed.env import read_launch_env
    from meshlm.inference.engine import Engine
    from meshlm.inference.loading import DTYPES, find_model_files, load_model, setup_layout

    torch.set_num_threads(spec.threads)
    env = read_launch_env()
    layout = setup_layout(env, spec.tp)
    loaded = load_model(find_model_files(run=spec.run_dir), env.device, DTYPES[spec.dtype], layout.tp_group)
    engine = Engine(
        loaded.model,
        loaded.tokenizer,
        max_batch=spec.max_batch,
        max_len=spec.max_model_len,
        tp_group=layout.tp_group,
        quantize=spec.quantize,
    )
    engine.reserve()  # the whole cache now: requests never wait for it to grow
    loop = _Loop(engine, layout.tp_group, conn)
    if conn is not None:
        conn.send(("ready",))
    loop.run()
    if layout.tp_group is not None:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


class _Loop:
    def __init__(self, engine, tp_group, conn):
        self.engine, self.tp_group, self.conn = engine, tp_group, conn
        self.ids: dict[int, int] = {}  # front id -> engine id
        self.front: dict[int, int] = {}  # engine id -> front id

    def _inbox(self) -> list[tuple]:
        """Rank 0: what the front sent since the last step (waits a while when idle)."""
        conn, msgs = self.conn, []
        try:
            if not self.engine.has_work and not conn.poll(IDLE_HEARTBEAT_S):
                return msgs
            while conn.poll():
                msgs.append(conn.recv())
        except (EOFError, OSError):  # the front is gone
            msgs.append(("stop",))
        return msgs

    def _share(self, msgs: list[tuple] | None) -> list[tuple]:
        if self.tp_group is None:
            return msgs
        import torch.distributed as dist

        box = [msgs]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
        return box[0]

    def _apply(self, msgs: list[tuple]) -> tuple[bool, list[tuple], bool]:
        """Apply adds and aborts in order; returns (stop, rejections, aborted anything)."""
        from meshlm.inference.engine import Request

        stop, rejected, aborted = False, [], False
        for msg in msgs:
            kind = msg[0]
            if kind == "add":
                _, fid, prompt_ids, params, logprobs = msg
                try:
                    eid = self.engine.add(Request(prompt_ids, params, logprobs))
                except ValueError as e:
                    rejected.append(("rejected", fid, str(e)))
                    continue
                self.ids[fid], self.front[eid] = eid, fid
            elif kind == "abort":
                eid = self.ids.pop(msg[1], None)
                if eid is not None:
                    self.front.pop(eid, None)
                    aborted |= self.engine.abort(eid)
            elif kind == "stop":
                stop = True
        return stop, rejected, aborted

    def run(self) -> None:
        main = self.conn is not None
        while True:
            msgs = self._share(self._inbox() if main else None)
            stop, rejected, aborted = self._apply(msgs)
            if stop:
                return
            events = self._encode(self.engine.step()) if self.engine.has_work else []
            if not main:
                continue
            for r in rejected:
                self.conn.send(r)
            if events or aborted:
                self.conn.send(("step", events, self.engine.num_running, self.engine.num_waiting))

    def _encode(self, events) -> list[tuple]:
        """Engine events -> the wire tuples (every rank: it also forgets finished requests)."""
        out = []
        for e in events:
            fid = self.front[e.index]
            finish = None
            if e.completion is not None:
                c = e.completion
                finish = (c.finish_reason, c.prompt_tokens, c.completion_tokens)
                del self.front[e.index], self.ids[fid]
            lp = None if e.logprobs is None else (e.logprobs.logprob, e.logprobs.top)
            out.append((fid, e.token_id, e.text, lp, finish))
        return out

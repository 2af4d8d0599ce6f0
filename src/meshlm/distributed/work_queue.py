"""Work handed out on demand: a list of items on global rank 0, taken by workers as they free up.

Static splitting (`items[rank::n]`) makes every worker wait for the slowest share; here a worker
asks for more when it has room, so a worker that drew long items simply takes fewer of them.

    queue = open_work_queue(items if rank == 0 else None, leaders)   # every rank of the world
    client = queue.client                                             # None on non-leaders
    client.top_up(free)            # ask for up to `free` items (non-blocking, one request in flight)
    client.wait()                  # block until an item has arrived, or until there are no more
    new = client.take(n)           # items received so far (non-blocking)
    client.put(results)            # results go back with the next request (recorded on rank 0 by `on_results`)
    client.exhausted               # True once no item will come any more
    queue.close()                  # every rank: leaders flush, rank 0 waits for everyone's results

`leaders` are the global ranks that take work (one per data-parallel group, global rank 0 among
them); the other ranks only take part in creating the queue's process group.

Rank 0 is a worker too: it takes from the list directly, and a background thread (the
dispatcher) answers the other leaders, so a request is answered while rank 0 computes (torch
releases the GIL in its kernels). Messages are pickled objects on a dedicated gloo group (CPU,
whatever the training backend), header then payload, with tags that keep requests, replies and
payloads apart. One request per leader is in flight at a time: a leader's results go back with
its next request, or on their own once the list is empty, so rank 0 records them as they finish.
"""

from __future__ import annotations

import pickle
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

_REQUEST, _REPLY = 1, 3  # header tags; the payload of a message uses tag + 1


def _send(obj: Any, dst: int, group, tag: int) -> None:
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    dist.send(torch.tensor([payload.numel()], dtype=torch.long), dst=dst, group=group, tag=tag)
    dist.send(payload, dst=dst, group=group, tag=tag + 1)


def _recv_payload(size: int, src: int, group, tag: int) -> Any:
    payload = torch.empty(size, dtype=torch.uint8)
    dist.recv(payload, src=src, group=group, tag=tag + 1)
    return pickle.loads(payload.numpy().tobytes())


class _Dispatcher:
    """Rank 0's list of items and the thread that answers the other leaders."""

    def __init__(self, items: Sequence[Any], remote: list[int], group, on_results: Callable[[list], None]):
        self._items = deque(items)
        self._lock = threading.Lock()
        self._on_results = on_results
        self._remote, self._group = remote, group
        self._error: BaseException | None = None
        self._thread = None
        if remote:
            self._thread = threading.Thread(target=self._serve, name="work-dispatcher", daemon=True)
            self._thread.start()

    def take(self, n: int) -> list:
        with self._lock:
            return [self._items.popleft() for _ in range(min(n, len(self._items)))]

    @property
    def empty(self) -> bool:
        with self._lock:
            return not self._items

    def record(self, results: list) -> None:
        if results:
            with self._lock:
                self._on_results(results)

    def _serve(self) -> None:
        try:
            running = len(self._remote)
            while running:
                header = torch.zeros(1, dtype=torch.long)
                work = dist.irecv(header, group=self._group, tag=_REQUEST)  # from any leader
                work.wait()
                src = work._source_rank()
                results, want, final = _recv_payload(int(header), src, self._group, _REQUEST)
                self.record(results)
                if final:
                    running -= 1
                    continue
                items = self.take(want)
                _send((items, self.empty), src, self._group, _REPLY)
        except BaseException as e:  # re-raised in the main thread by join()
            self._error = e

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"the work dispatcher failed: {self._error}") from self._error


class LocalClient:
    """Rank 0's own leader: takes from the list directly; results are recorded at once."""

    def __init__(self, dispatcher: _Dispatcher):
        self._dispatcher = dispatcher

    def top_up(self, free: int) -> None:
        pass

    def wait(self) -> None:
        pass

    def take(self, n: int) -> list:
        return self._dispatcher.take(n)

    def put(self, results: list) -> None:
        self._dispatcher.record(results)

    @property
    def exhausted(self) -> bool:
        return self._dispatcher.empty

    def close(self) -> None:
        pass


class RemoteClient:
    """Another leader: asks rank 0's dispatcher, at most one request in flight (polled, no thread)."""

    def __init__(self, group):
        self._group = group
        self._inbox: deque = deque()
        self._results: list = []
        self._pending: tuple[torch.Tensor, Any] | None = None  # (reply header, its receive)
        self._done = False  # the dispatcher said its list is empty

    def _poll(self, block: bool = False) -> None:
        if self._pending is None:
            return
        header, work = self._pending
        if not block and not work.is_completed():
            return
        work.wait()
        self._pending = None
        items, done = _recv_payload(int(header), 0, self._group, _REPLY)
        self._inbox.extend(items)
        self._done = self._done or done

    def _request(self, want: int, final: bool = False) -> None:
        results, self._results = self._results, []
        _send((results, want, final), 0, self._group, _REQUEST)
        if not final:
            header = torch.zeros(1, dtype=torch.long)
            self._pending = (header, dist.irecv(header, src=0, group=self._group, tag=_REPLY))

    def top_up(self, free: int) -> None:
        """Make sure up to `free` items are here or asked for; send finished results along."""
        self._poll()
        if self._pending is not None:
            return
        want = 0 if self._done else free - len(self._inbox)
        if want > 0 or self._results:
            self._request(max(want, 0))

    def wait(self) -> None:
        """Block until an item is here or none will come (asking if nothing is in flight)."""
        while not self._inbox and not self._done:
            if self._pending is None:
                self._request(1)
            self._poll(block=True)

    def take(self, n: int) -> list:
        self._poll()
        return [self._inbox.popleft() for _ in range(min(n, len(self._inbox)))]

    def put(self, results: list) -> None:
        """Results go back with the next request (`top_up`), at once when no more work will come."""
        self._results.extend(results)
        if self._done:
            self.top_up(0)

    @property
    def exhausted(self) -> bool:
        self._poll()
        return self._done and not self._inbox

    def close(self) -> None:
        """The last results and the final message (this leader takes nothing more)."""
        self._poll(block=True)
        self._request(0, final=True)


class WorkQueue:
    def __init__(self, client, dispatcher: _Dispatcher | None):
        self.client = client
        self._dispatcher = dispatcher

    def close(self) -> None:
        """Leaders send their last results; rank 0 returns once every leader's are recorded."""
        if self.client is not None:
            self.client.close()
        if self._dispatcher is not None:
            self._dispatcher.join()


def open_work_queue(
    items: Sequence[Any] | None,
    leaders: list[int],
    on_results: Callable[[list], None] | None = None,
) -> WorkQueue:
    """Every rank calls this (with several leaders, it creates a process group over the world).
    Global rank 0 passes the items, in the order they should be handed out, and `on_results`,
    which it calls with each batch of results (from any leader, one call at a time). A single
    leader [0] works alone: nothing is communicated (a rank that is not one is simply idle)."""
    if leaders[0] != 0:
        raise ValueError(f"global rank 0 must be the first leader, got leaders {leaders}")
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    group = dist.new_group(backend="gloo") if len(leaders) > 1 else None
    if rank == 0:
        dispatcher = _Dispatcher(items or [], leaders[1:], group, on_results or (lambda results: None))
        return WorkQueue(LocalClient(dispatcher), dispatcher)
    return WorkQueue(RemoteClient(group) if rank in leaders else None, None)

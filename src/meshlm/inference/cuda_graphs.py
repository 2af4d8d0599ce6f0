"""Decode steps replayed from CUDA graphs, for any family whose DecodeState has the optional
fixed-shape step `decode_static` (see meshlm.model.spec). GPU only: a speedup, never required.

A small model's decode step on a GPU is a few hundred tiny kernels, and launching them from
Python costs more than running them. A graph records the whole step once and replays it with
one launch. Graphs need fixed shapes and addresses, so there is one per batch bucket (1, 2, 4,
... up to the state's max_batch; a batch is padded up to its bucket with rows of free slots).
They are recorded when the state is new, every slot free, so the recording's writes touch no
sequence; they belong to that state. Not used under tensor parallelism (collectives inside
graphs are left out on purpose).

With `capture=False` the same padded fixed-shape steps run eagerly: how the tests check
everything but the recording on a CPU.
"""

from __future__ import annotations

import torch


def buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to max_batch (included)."""
    out = [1]
    while out[-1] < max_batch:
        out.append(min(2 * out[-1], max_batch))
    return out


class GraphedDecodeState:
    """A DecodeState whose decode replays a graph of the wrapped state's `decode_static`;
    everything else is the wrapped state's."""

    def __init__(self, state, device: torch.device | str, capture: bool = True):
        self.state, self.device, self.capture = state, torch.device(device), capture
        self.max_batch, self.max_len = state.max_batch, state.max_len
        self.lengths = state.lengths  # the same list: the wrapped state's bookkeeping
        if any(self.lengths):
            raise ValueError("CUDA graphs are recorded on a fresh decode state (every slot free)")
        self.pool = None
        with torch.inference_mode():
            self.steps = {nb: self._record(nb) for nb in buckets(self.max_batch)}

    def _record(self, nb: int):
        """(graph or None, static tokens, static positions, static logits or None) of bucket nb."""
        tokens = torch.zeros(nb, dtype=torch.long, device=self.device)
        positions = torch.full((nb,), self.max_len - 1, dtype=torch.long, device=self.device)
        if not self.capture:
            return None, tokens, positions, None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, lazy init)
            for _ in range(2):
                self.state.decode_static(tokens, positions)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.state.decode_static(tokens, positions)
        if self.pool is None:
            self.pool = graph.pool()
        return graph, tokens, positions, logits

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        lengths = self.lengths[:n]
        if max(lengths) + 1 > self.max_len:
            raise ValueError(f"a sequence would exceed the cache length {self.max_len}")
        nb = next(b for b in self.steps if b >= n)
        if any(self.lengths[n:nb]):  # the padding rows would land on live sequences
            return self.state.decode(tokens)
        graph, static_tokens, static_positions, logits = self.steps[nb]
        static_tokens[:n].copy_(tokens)
        static_positions[:n].copy_(torch.tensor(lengths, dtype=torch.long).to(self.device, non_blocking=True))
        static_positions[n:].fill_(self.max_len - 1)
        if graph is None:
            logits = self.state.decode_static(static_tokens, static_positions)
        else:
            graph.replay()
        for s in range(n):
            self.lengths[s] += 1
        return logits[:n].clone()

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        return self.state.prefill(prompts, slots)

    def release(self, slot: int) -> None:
        self.state.release(slot)

    def move_slot(self, src: int, dst: int) -> None:
        self.state.move_slot(src, dst)

    def nbytes(self) -> int:
        return self.state.nbytes()

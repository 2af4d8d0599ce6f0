"""Validation loss and perplexity of a model on a corpus: `meshlm eval --run DIR --data SRC`.

The corpus (any `data.source`: a directory, a glob, a text, .jsonl or .parquet file) is read
in its deterministic document order and encoded with the run's own tokenizer.json, the
documents joined by the end-of-text token as in the training data. The token stream is cut
into fixed, non-overlapping windows of `seq_len` predictions (the last one may be shorter),
so every token after the first is predicted exactly once, with the context of its window.

Data parallel, with the same result for every number of processes: the windows form fixed
batches of `batch_size`, handed out on demand (distributed/work_queue.py: a rank asks for the
next batch while it computes the current one, so a slower or busier rank simply computes fewer).
A batch has the same shape whichever rank computes it, so its loss sum is the same bits on any
layout; rank 0 collects the per-batch sums and adds them up in batch order in float64.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from meshlm.config import ConfigError
from meshlm.data.sources import iter_documents
from meshlm.data.tokenizer import end_of_text_id
from meshlm.distributed.work_queue import open_work_queue


@dataclass
class EvalResult:
    loss: float  # mean next-token cross-entropy, nats
    perplexity: float
    tokens: int  # predicted tokens
    windows: int
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_corpus(source: str, tokenizer, max_bytes: int = 0) -> torch.Tensor:
    """The corpus as one int64 token stream, documents separated by the tokenizer's end-of-text
    token as in training (joined directly when the tokenizer has none)."""
    separator = end_of_text_id(tokenizer)
    ids: list[int] = []
    for i, text in enumerate(iter_documents(source, max_bytes)):
        if i and separator is not None:
            ids.append(separator)
        ids.extend(tokenizer.encode(text).ids)
    return torch.tensor(ids, dtype=torch.long)


def windows(n_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """(start, length) of each window: inputs tokens[start:start+length], targets shifted by one."""
    if n_tokens < 2:
        raise ConfigError(f"the corpus has {n_tokens} token(s); evaluation needs at least 2.")
    predictions = n_tokens - 1
    return [(s, min(seq_len, predictions - s)) for s in range(0, predictions, seq_len)]


@torch.no_grad()
def evaluate_tokens(
    model: nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int = 8, rank: int = 0, world: int = 1
) -> EvalResult:
    """Every rank of the world (`world` of them, this one `rank`) passes the same tokens and gets
    the result; the batches are handed out on demand."""
    if seq_len > model.cfg.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len} is longer than the model's context ({model.cfg.max_seq_len}).")
    device = next(model.parameters()).device
    spans = windows(len(tokens), seq_len)
    # Full windows in batches of batch_size; a shorter last window is a batch of its own.
    full = [s for s in spans if s[1] == seq_len]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[s] for s in spans if s[1] != seq_len]
    sums = torch.zeros(len(batches), dtype=torch.float64)

    def record(results: list[tuple[int, float]]) -> None:  # rank 0
        for b, value in results:
            sums[b] = value

    if world > 1 and rank != dist.get_rank():
        raise ValueError(f"evaluate_tokens: rank {rank} is not this process's rank {dist.get_rank()}")
    queue = open_work_queue(list(range(len(batches))) if rank == 0 else None, list(range(world)), record)
    client = queue.client
    while True:
        client.top_up(2)  # the batch to compute and the next: a rank never waits for a reply
        client.wait()
        got = client.take(1)
        if not got:
            break
        b = got[0]
        length = batches[b][0][1]
        idx = torch.tensor([start for start, _ in batches[b]]).unsqueeze(1) + torch.arange(length + 1)
        window = tokens[idx].to(device)  # (B, T+1)
        logits = model(window[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), window[:, 1:].flatten(), reduction="sum")
        client.put([(b, loss.double().item())])
    queue.close()
    if world > 1:  # rank 0 has every batch's sum
        on_device = sums.to(device)
        dist.broadcast(on_device, src=0)
        sums = on_device.cpu()
    n = sum(length for _, length in spans)
    loss = float(sums.sum()) / n
    return EvalResult(loss, math.exp(loss), n, len(spans), seq_len)

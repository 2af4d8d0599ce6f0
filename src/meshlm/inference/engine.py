"""The generation engine: the model family's decoding state, prefill then decode, continuous batching.

    engine = Engine(model, tokenizer, max_batch=16)
    for event in engine.stream([Request(ids, SamplingParams(temperature=0))]):
        print(event.text, end="")                    # tokens as they are produced
    completions = engine.generate(requests)          # or all at once, in request order

The state (`FamilySpec.decode_state`: the family's incremental state, e.g. a key/value cache or a recurrent (h, c))
holds up to `max_batch` sequences in slots; the engine drives it through the DecodeState
methods only (prefill, decode, release, move_slot, lengths), so every family generates here.

Schedule: up to `max_batch` sequences are active, each in one slot of the state. Waiting
requests are admitted whenever slots are free; their prompts are prefilled together (packed,
no padding) and each gets its first token from the prefill. Otherwise all active sequences
decode one token each, every one at its own position. A finished sequence frees its slot at
once (the last active slot moves into the gap, so active slots stay 0..n-1) and a waiting
request takes it: long and short requests do not hold each other up.

Every request is sampled with its own parameters and its own random generator, so its output
depends only on its prompt, parameters and seed, not on which requests share its batch.

Tensor parallelism: give the engine a shard made by `apply_tensor_parallel` (without sequence
parallelism) and the TP group. Every rank of the group must call `stream`/`generate` with the
same requests; the full logits are gathered on every rank and the token sampled on group rank
0 is broadcast, so all ranks follow the same schedule.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import tokenizers
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from meshlm.data.tokenizer import EOT_ID
from meshlm.inference.decoding import Decoder
from meshlm.inference.sampling import SamplingParams, sample_rows
from meshlm.inference.text_stream import TextStream
from meshlm.model.spec import DecodeState


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Completion:
    prompt_tokens: int
    token_ids: list[int]
    text: str  # "" without a tokenizer
    finish_reason: str  # "stop" (stop string or stop token) or "length" (max_new_tokens or the context)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class StreamEvent:
    index: int  # position of the request in the list given to `stream`
    token_id: int | None  # the new token (None on a finish without a new token)
    text: str  # newly final text (may be empty)
    completion: Completion | None = None  # set on the request's last event

    @property
    def finished(self) -> bool:
        return self.completion is not None


@dataclass
class _Sequence:
    index: int
    request: Request
    prompt: list[int]
    generator: torch.Generator | None
    stream: TextStream
    tokens: list[int] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: tokenizers.Tokenizer | None = None,
        max_batch: int = 16,
        max_len: int | None = None,
        tp_group: ProcessGroup | None = None,
        prefill_tokens: int = 4096,
        pack_weights: bool | None = None,
        cuda_graphs: bool | None = None,
    ):
        """max_batch: sequences decoded together (slots of the decode state); max_len: the longest
        sequence, prompt included (default and upper bound: the model's max_seq_len);
        prefill_tokens: prompt tokens prefilled together (admission stops at this budget;
        a longer prompt is prefilled alone); pack_weights: decode with the family's fused
        decode_model and prepacked linears (inference/decoding; default: CPU float32);
        cuda_graphs: replay decode steps from CUDA graphs (default: on a GPU without TP)."""
        self.model = model.eval()
        self.decoder = Decoder(model, pack_weights, cuda_graphs)
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.prefill_tokens = prefill_tokens
        info = getattr(model, "tensor_parallel", None)
        self.tp_group = tp_group if info is not None and info.tp > 1 else None
        if info is not None and info.tp > 1 and tp_group is None:
            raise ValueError("a tensor-parallel model needs its tp_group")
        self.vocab_size = model.cfg.vocab_size
        self.device = next(model.parameters()).device
        self.cache: DecodeState | None = None

    # ------------------------------------------------------------------ public

    def check(self, request: Request) -> None:
        """Raise ValueError if the request cannot run (its prompt does not fit the context)."""
        n = len(request.prompt_ids)
        if n >= self.max_len:
            raise ValueError(
                f"the prompt has {n} tokens; the model's context is {self.max_len} tokens, "
                f"so a prompt can have at most {self.max_len - 1}"
            )
        bad = [t for t in request.prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0 .. {self.vocab_size - 1})")

    def generate(
        self, requests: Sequence[Request], on_event: Callable[[StreamEvent], None] | None = None
    ) -> list[Completion]:
        """Run every request to the end; completions in request order."""
        out: list[Completion | None] = [None] * len(requests)
        for event in self.stream(requests):
            if on_event is not None:
                on_event(event)
            if event.completion is not None:
                out[event.index] = event.completion
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def stream(self, requests: Sequence[Request]) -> Iterator[StreamEvent]:
        """Yield an event for every token as it is produced (and the finish of each request)."""
        for r in requests:
            self.check(r)
        if not requests:
            return
        need = max(min(len(r.prompt_ids or [EOT_ID]) + r.params.max_new_tokens, self.max_len) for r in requests)
        cache = self._cache(min(len(requests), self.max_batch), need)
        vocab = self.vocab_size
        use_seen = any(r.params.repetition_penalty != 1.0 for r in requests)
        seen = torch.zeros(cache.max_batch, vocab, dtype=torch.bool, device=self.device) if use_seen else None
        next_tokens = torch.zeros(cache.max_batch, dtype=torch.long, device=self.device)
        pending = deque(range(len(requests)))
        active: list[_Sequence] = []

        while pending or active:
            new: list[_Sequence] = []
            budget = self.prefill_tokens
            while pending and len(active) + len(new) < cache.max_batch:
                request = requests[pending[0]]
                prompt = list(request.prompt_ids) or [EOT_ID]
                if new and len(prompt) > budget:
                    break
                index = pending.popleft()
                if request.params.max_new_tokens == 0:
                    yield StreamEvent(index, None, "", Completion(len(prompt), [], "", "length"))
                    continue
                budget -= len(prompt)
                new.append(self._new_sequence(index, request, prompt))
            if new:
                first = len(active)
                slots = list(range(first, first + len(new)))
                for s in slots:
                    cache.release(s)
                if seen is not None:
                    seen[first : first + len(new)] = False
                    for s, seq in zip(slots, new):
                        seen[s, torch.tensor(seq.prompt, device=self.device)] = True
                logits = cache.prefill([seq.prompt for seq in new], slots)
                active.extend(new)
                rows = slice(first, first + len(new))
            elif active:
                logits = cache.decode(next_tokens[: len(active)])
                rows = slice(0, len(active))
            else:
                continue
            batch = active[rows]
            tokens = self._sample(logits, batch, None if seen is None else seen[rows])
            next_tokens[rows] = tokens
            if seen is not None:
                seen[torch.arange(rows.start, rows.stop, device=self.device), tokens] = True
            finished = []
            for offset, (seq, token) in enumerate(zip(batch, tokens.tolist())):
                slot = rows.start + offset
                event = self._advance(seq, token, cache.lengths[slot])
                if event.completion is not None:
                    finished.append(slot)
                yield event
            for slot in sorted(finished, reverse=True):  # keep active slots 0..n-1
                last = len(active) - 1
                if slot != last:
                    cache.move_slot(last, slot)
                    next_tokens[slot] = next_tokens[last]
                    if seen is not None:
                        seen[slot] = seen[last]
                    active[slot] = active[last]
                else:
                    cache.release(slot)
                active.pop()

    # ------------------------------------------------------------------ internals

    def _cache(self, batch: int, length: int) -> DecodeState:
        """Reuse the decode state when it is large enough, else build one through the family's
        spec (length rounded up to 64)."""
        c = self.cache
        if c is None or c.max_batch < batch or c.max_len < length:
            length = min(-(-length // 64) * 64, self.max_len)
            if c is not None:
                batch, length = max(batch, c.max_batch), max(length, c.max_len)
            self.cache = None  # free the old one first
            self.cache = self.decoder.new_state(batch, length)
        return self.cache

    def _new_sequence(self, index: int, request: Request, prompt: list[int]) -> _Sequence:
        p = request.params
        generator = None
        if not p.greedy:
            seed = p.seed if p.seed is not None else random.SystemRandom().getrandbits(63)
            generator = torch.Generator().manual_seed(seed)
        return _Sequence(index, request, prompt, generator, TextStream(self.tokenizer, p.stop))

    def _sample(self, logits: torch.Tensor, batch: list[_Sequence], seen: torch.Tensor | None) -> torch.Tensor:
        if self.tp_group is not None:
            from meshlm.parallel.vocab_parallel import gather_vocab_logits

            logits = gather_vocab_logits(logits, self.tp_group, self.vocab_size)
        tokens = sample_rows(logits, [s.request.params for s in batch], [s.generator for s in batch], seen)
        if self.tp_group is not None:  # every rank continues with rank 0's tokens
            dist.broadcast(tokens, src=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
        return tokens

    def _advance(self, seq: _Sequence, token: int, cached: int) -> StreamEvent:
        p = seq.request.params
        seq.tokens.append(token)
        reason = None
        text = ""
        if token in p.stop_token_ids:
            reason = "stop"
        else:
            text = seq.stream.push(token)
            if seq.stream.stopped:
                reason = "stop"
            elif len(seq.tokens) >= p.max_new_tokens or cached >= self.max_len:
                reason = "length"  # the token just sampled cannot be fed: the context is full
        if reason is None:
            return StreamEvent(seq.index, token, text)
        text += seq.stream.flush()
        completion = Completion(len(seq.prompt), seq.tokens, seq.stream.text, reason)
        return StreamEvent(seq.index, token, text, completion)

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
same requests (online: the same `add`/`abort` calls, in the same order, between the same
`step` calls); the full logits are gathered on every rank and the token sampled on group rank
0 is broadcast, so all ranks follow the same schedule.
"""

from __future__ import annotations

import dataclasses
import random
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
    # Log-probabilities on every event: None = none; k >= 0 = the sampled token's and the k
    # most likely tokens' (see Engine._logprobs).
    logprobs: int | None = None


@dataclass
class TokenLogprobs:
    logprob: float  # of the sampled token
    top: list[tuple[int, float]]  # (token id, logprob) of the most likely tokens, best first


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
    index: int  # position of the request in the list given to `stream` (its id from `add` for `step`)
    token_id: int | None  # the new token (None on a finish without a new token)
    text: str  # newly final text (may be empty)
    completion: Completion | None = None  # set on the request's last event
    logprobs: TokenLogprobs | None = None  # when the request asked for them

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
        # Scheduler state (see `step`): requests waiting for a slot, in arrival order, and the
        # active sequences, sequence i in cache slot i.
        self._waiting: dict[int, Request] = {}
        self._active: list[_Sequence] = []
        self._next_id = 0
        self._next_tokens = torch.zeros(0, dtype=torch.long, device=self.device)  # fed at the next decode
        self._seen: torch.Tensor | None = None  # (slots, vocab) tokens seen, for the repetition penalty

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

    def stream(self, requests: Sequence[Request]) -> Iterator[StreamEvent]:
        """Yield an event for every token as it is produced (and the finish of each request);
        an event's `index` is the request's position in `requests`. A thin loop over the
        online interface (`add` / `step`), run until these requests are done."""
        for r in requests:
            self.check(r)
        if not requests:
            return
        # Size the cache for the whole list up front: a later, longer request never waits for
        # the active ones to drain before the cache can grow.
        if not self._active:
            self._cache(min(len(requests), self.max_batch), max(self._need(r) for r in requests))
        position = {self.add(r): i for i, r in enumerate(requests)}
        try:
            while position:
                for event in self.step():
                    index = position.get(event.index)
                    if index is None:  # a request added through the online interface meanwhile
                        continue
                    if event.completion is not None:
                        del position[event.index]
                    yield dataclasses.replace(event, index=index)
        finally:  # the caller stopped early: free what is left of its requests
            for rid in position:
                self.abort(rid)

    # ------------------------------------------------------------------ online interface
    # A server adds and aborts requests at any time and calls `step` in a loop; `stream`
    # and `generate` are loops over the same three calls.

    def reserve(self, max_batch: int | None = None, max_len: int | None = None) -> None:
        """Allocate the cache for `max_batch` sequences of `max_len` tokens now (default: the
        engine's limits). Without it the cache grows only while no sequence is active, so a
        long request may wait for the active ones to finish."""
        self._cache(min(max_batch or self.max_batch, self.max_batch), min(max_len or self.max_len, self.max_len))

    def add(self, request: Request) -> int:
        """Queue a request; returns its id (the `index` of its events from `step`). Raises
        ValueError if it cannot run (see `check`)."""
        self.check(request)
        rid = self._next_id
        self._next_id += 1
        self._waiting[rid] = request
        return rid

    def abort(self, rid: int) -> bool:
        """Drop a waiting or active request at once (its slot is free for the next step).
        No event follows. False if the request is unknown or already finished."""
        if self._waiting.pop(rid, None) is not None:
            return True
        for slot, seq in enumerate(self._active):
            if seq.index == rid:
                self._free_slot(slot)
                return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._active)

    @property
    def num_running(self) -> int:
        """Sequences holding a cache slot."""
        return len(self._active)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @torch.inference_mode()
    def step(self) -> list[StreamEvent]:
        """One batch step: admit waiting requests into free slots and prefill their prompts
        (each gets its first token), or else decode one token for every active sequence.
        Returns the events of this step (empty when there is nothing to do)."""
        events: list[StreamEvent] = []
        new = self._admit(events)
        active = self._active
        cache = self.cache
        if new:
            first = len(active)
            slots = list(range(first, first + len(new)))
            for s in slots:
                cache.release(s)
            if self._seen is not None:
                self._seen[first : first + len(new)] = False
                for s, seq in zip(slots, new):
                    self._seen[s, torch.tensor(seq.prompt, device=self.device)] = True
            logits = cache.prefill([seq.prompt for seq in new], slots)
            active.extend(new)
            rows = slice(first, first + len(new))
        elif active:
            logits = cache.decode(self._next_tokens[: len(active)])
            rows = slice(0, len(active))
        else:
            return events
        batch = active[rows]
        seen = self._seen
        tokens, full_logits = self._sample(logits, batch, None if seen is None else seen[rows])
        self._next_tokens[rows] = tokens
        if seen is not None:
            seen[torch.arange(rows.start, rows.stop, device=self.device), tokens] = True
        logprobs = self._logprobs(full_logits, batch, tokens)
        finished = []
        for offset, (seq, token) in enumerate(zip(batch, tokens.tolist())):
            slot = rows.start + offset
            event = self._advance(seq, token, cache.lengths[slot])
            if logprobs is not None:
                event.logprobs = logprobs[offset]
            if event.completion is not None:
                finished.append(slot)
            events.append(event)
        for slot in sorted(finished, reverse=True):  # keep active slots 0..n-1
            self._free_slot(slot)
        return events

    # ------------------------------------------------------------------ internals

    def _cache(self, batch: int, length: int) -> DecodeState:
        """Reuse the cache when it is large enough, else allocate one (length rounded up to 64).
        Only called while no sequence is active: a new cache holds no keys and values."""
        c = self.cache
        if c is None or c.max_batch < batch or c.max_len < length:
            assert not self._active, "the cache cannot grow under active sequences"
            length = min(-(-length // 64) * 64, self.max_len)
            if c is not None:
                batch, length = max(batch, c.max_batch), max(length, c.max_len)
            self.cache = None  # free the old one first
            self.cache = self.decoder.new_state(batch, length)
            self._next_tokens = torch.zeros(batch, dtype=torch.long, device=self.device)
            self._seen = None
        return self.cache

    def _need(self, request: Request) -> int:
        """Cache positions the request can use: its prompt and output, within the context."""
        return min(len(request.prompt_ids or [EOT_ID]) + request.params.max_new_tokens, self.max_len)

    def _admit(self, events: list[StreamEvent]) -> list[_Sequence]:
        """Move waiting requests (first come, first served) into free slots, up to the prefill
        token budget; requests with nothing to generate finish here, into `events`."""
        waiting = self._waiting
        if not waiting:
            return []
        if not self._active:  # an idle engine may grow its cache for what waits
            head = list(waiting.values())[: self.max_batch]
            self._cache(len(head), max(self._need(r) for r in head))
        cache = self.cache
        new: list[_Sequence] = []
        budget = self.prefill_tokens
        while waiting and len(self._active) + len(new) < cache.max_batch:
            rid, request = next(iter(waiting.items()))
            prompt = list(request.prompt_ids) or [EOT_ID]
            if new and len(prompt) > budget:
                break
            if self._need(request) > cache.max_len:
                break  # waits until the engine is idle and the cache can grow (see `reserve`)
            del waiting[rid]
            if request.params.max_new_tokens == 0:
                events.append(StreamEvent(rid, None, "", Completion(len(prompt), [], "", "length")))
                continue
            budget -= len(prompt)
            new.append(self._new_sequence(rid, request, prompt))
        if new and self._seen is None and any(s.request.params.repetition_penalty != 1.0 for s in new):
            self._track_seen()
        return new

    def _track_seen(self) -> None:
        """Start tracking the tokens each slot has seen (for the repetition penalty),
        filled in for the sequences already active."""
        seen = torch.zeros(self.cache.max_batch, self.vocab_size, dtype=torch.bool, device=self.device)
        for slot, seq in enumerate(self._active):
            seen[slot, torch.tensor(seq.prompt + seq.tokens, device=self.device)] = True
        self._seen = seen

    def _free_slot(self, slot: int) -> None:
        """Release a slot; the last active sequence moves into the gap (slots stay 0..n-1)."""
        active, cache = self._active, self.cache
        last = len(active) - 1
        if slot != last:
            cache.move_slot(last, slot)
            self._next_tokens[slot] = self._next_tokens[last]
            if self._seen is not None:
                self._seen[slot] = self._seen[last]
            active[slot] = active[last]
        else:
            cache.release(slot)
        active.pop()

    def _new_sequence(self, index: int, request: Request, prompt: list[int]) -> _Sequence:
        p = request.params
        generator = None
        if not p.greedy:
            seed = p.seed if p.seed is not None else random.SystemRandom().getrandbits(63)
            generator = torch.Generator().manual_seed(seed)
        return _Sequence(index, request, prompt, generator, TextStream(self.tokenizer, p.stop))

    def _sample(
        self, logits: torch.Tensor, batch: list[_Sequence], seen: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's next tokens, and the full (vocabulary-gathered) logits they came from."""
        if self.tp_group is not None:
            from meshlm.parallel.vocab_parallel import gather_vocab_logits

            logits = gather_vocab_logits(logits, self.tp_group, self.vocab_size)
        tokens = sample_rows(logits, [s.request.params for s in batch], [s.generator for s in batch], seen)
        if self.tp_group is not None:  # every rank continues with rank 0's tokens
            dist.broadcast(tokens, src=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
        return tokens, logits

    def _logprobs(
        self, logits: torch.Tensor, batch: list[_Sequence], tokens: torch.Tensor
    ) -> list[TokenLogprobs | None] | None:
        """Log-probabilities of the sampled tokens (and the top alternatives) for the rows that
        asked for them, under the model's own distribution (before temperature, top-k, top-p
        and the repetition penalty), as OpenAI-compatible servers report them."""
        rows = [b for b, s in enumerate(batch) if s.request.logprobs is not None]
        if not rows:
            return None
        index = torch.tensor(rows, device=logits.device)
        logp = torch.log_softmax(logits[index].float(), dim=-1)
        chosen = logp.gather(1, tokens[index].unsqueeze(1)).squeeze(1).tolist()
        k = max(batch[b].request.logprobs for b in rows)
        top = torch.topk(logp, k, dim=-1) if k else None
        out: list[TokenLogprobs | None] = [None] * len(batch)
        for j, b in enumerate(rows):
            n = batch[b].request.logprobs
            alternatives = (
                list(zip(top.indices[j, :n].tolist(), top.values[j, :n].tolist())) if top is not None and n else []
            )
            out[b] = TokenLogprobs(chosen[j], alternatives)
        return out

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

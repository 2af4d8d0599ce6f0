"""Incremental decoding for the LSTM: the state of a sequence is (h, c) of every layer after its
last token, so each new token costs one step of every layer, whatever its position (a
transformer's cost per token grows with its KV cache; an LSTM's does not).

The state is a preallocated (n_layers, max_batch, d_hidden) pair of tensors: slot s of every
layer holds sequence s's (h, c). Zeros are the state of an empty sequence (nn.LSTM's default
initial state): a slot of length 0 (released, or moved away) starts from zeros at its next
prefill, whatever it still holds. Everything runs through the model's own modules
(embedding, each block's nn.LSTM, projection, output layer), so the same code drives a
tensor-parallel shard: the vocabulary-parallel embedding sums its lookups over the group and
the output layer returns this rank's vocabulary slice of the logits.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pack_padded_sequence

from meshlm.model.lstm.model import LSTMLanguageModel


class LSTMDecodeState:
    """DecodeState (meshlm.model.spec) of an LSTMLanguageModel: (h, c) per slot per layer."""

    def __init__(self, model: LSTMLanguageModel, max_batch: int, max_len: int):
        if model.embedding is None or model.output is None:
            raise ValueError("decoding needs the whole model (a pipeline stage cannot decode alone)")
        self.model = model
        self.max_batch, self.max_len = max_batch, max_len
        self.lengths = [0] * max_batch
        weight = next(model.layers["0"].parameters())
        shape = (len(model.layers), max_batch, model.cfg.d_hidden)
        self.h = torch.zeros(shape, dtype=weight.dtype, device=weight.device)  # (L, max_batch, H)
        self.c = torch.zeros_like(self.h)

    def _check_room(self, slot: int, new_tokens: int) -> None:
        if not 0 <= slot < self.max_batch:
            raise ValueError(f"slot {slot} is outside [0, {self.max_batch})")
        if self.lengths[slot] + new_tokens > self.max_len:
            raise ValueError(
                f"slot {slot} holds {self.lengths[slot]} tokens; {new_tokens} more exceed max_len {self.max_len}"
            )

    def _logits(self, top: torch.Tensor) -> torch.Tensor:
        """top: the last layer's output (n, 1, H) -> logits (n, V_local)."""
        m = self.model
        if m.proj is not None:
            top = m.proj(top)  # (n, 1, d_embed)
        return m.output(top)[:, -1]  # (n, V_local)

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Run each prompt from its slot's state, all prompts together as one packed batch
        (no padding is computed); return the logits after each prompt's last token (n, V_local)."""
        if len(prompts) != len(slots) or len(set(slots)) != len(slots):
            raise ValueError(f"{len(prompts)} prompts for slots {slots}: one distinct slot per prompt")
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        for prompt, slot in zip(prompts, slots):
            self._check_room(slot, len(prompt))
        m = self.model
        device = self.h.device
        lengths = torch.tensor([len(p) for p in prompts])
        tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=device)  # (n, T_max)
        for i, prompt in enumerate(prompts):
            tokens[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        index = torch.tensor(slots, device=device)
        # A slot of length 0 holds no sequence: it starts from zeros, whatever it still holds.
        fresh = torch.tensor([self.lengths[s] == 0 for s in slots], device=device).view(-1, 1)  # (n, 1)
        x = pack_padded_sequence(m.embedding(tokens), lengths, batch_first=True, enforce_sorted=False)
        for layer, block in enumerate(m.layers.values()):
            # (1, n, H) each: nn.LSTM sorts them with the packed batch and returns them in prompt order
            h0 = self.h[layer, index].masked_fill(fresh, 0.0).unsqueeze(0)
            c0 = self.c[layer, index].masked_fill(fresh, 0.0).unsqueeze(0)
            x, (h, c) = block.lstm(x, (h0, c0))
            self.h[layer, index], self.c[layer, index] = h[0], c[0]
        for prompt, slot in zip(prompts, slots):
            self.lengths[slot] += len(prompt)
        # The last layer's h after a prompt's last token is its output there (no dropout in eval).
        return self._logits(self.h[-1, index].unsqueeze(1))

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token (tokens: (n,) long) for each of the slots 0..n-1 -> (n, V_local) logits."""
        n = tokens.shape[0]
        for slot in range(n):
            self._check_room(slot, 1)
        logits = self._step(tokens)
        for slot in range(n):
            self.lengths[slot] += 1
        return logits

    @torch.no_grad()
    def decode_static(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The fixed-shape step CUDA graphs record (meshlm.model.spec): the same step without the
        host-side bookkeeping. `positions` is not needed: (h, c) is where a sequence stands."""
        return self._step(tokens)

    def _step(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        m = self.model
        x = m.embedding(tokens.view(n, 1))[:, 0]  # (n, d_embed)
        for layer, block in enumerate(m.layers.values()):
            # One time step of the block's nn.LSTM with its own weights, as one fused cell: a
            # sequence-of-one nn.LSTM call costs several times more on CPU (oneDNN sets up its
            # RNN primitive per call), for the same maths.
            lstm = block.lstm
            h, c = torch.lstm_cell(
                x,
                (self.h[layer, :n], self.c[layer, :n]),
                lstm.weight_ih_l0,
                lstm.weight_hh_l0,
                lstm.bias_ih_l0,
                lstm.bias_hh_l0,
            )  # (n, H) each
            self.h[layer, :n], self.c[layer, :n] = h, c  # in place: the state's tensors never move
            x = h  # the layer's output is its new h
        return self._logits(x.unsqueeze(1))

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0  # its (h, c) is never read again: the next prefill starts from zeros

    def move_slot(self, src: int, dst: int) -> None:
        """Sequence `src` continues in slot `dst`; `src` is free afterwards."""
        self.h[:, dst] = self.h[:, src]
        self.c[:, dst] = self.c[:, src]
        self.lengths[dst], self.lengths[src] = self.lengths[src], 0

    def nbytes(self) -> int:
        return self.h.nbytes + self.c.nbytes


def decode_state(model: LSTMLanguageModel, max_batch: int, max_len: int) -> LSTMDecodeState:
    return LSTMDecodeState(model, max_batch, max_len)

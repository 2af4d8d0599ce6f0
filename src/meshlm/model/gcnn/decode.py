"""Incremental decoding for the gated CNN: a rolling buffer of the last k-1 inputs of each
block's convolution, per slot (meshlm.model.spec.DecodeState).

A causal convolution of width k at position t reads only its inputs t-k+1..t. Keeping the last
k-1 inputs of every block's convolution is therefore all the state a sequence needs: a new
token costs one position of every block, whatever its position (no recomputation of the
prefix, no cache that grows with the sequence). The state of a slot is

    past    (n_layers, max_batch, c_in, k-1)    the inputs u = down(norm(x)) of each block's
                                                convolution at the slot's last k-1 positions

and it starts as zeros: exactly the causal padding the training forward uses, so decoding from
an empty slot equals the full forward. Memory is independent of max_len.

Prefill runs the model's own blocks (GatedConv with `past` in place of the padding). A decode
step computes one position per slot, so each convolution becomes a matrix product of the
window (n, c_in * k) with the module's own kernel viewed as (C, c_in * k): the same sums,
without conv1d's general path (several times slower for a single output column on CPU), and
no copy of the weights. The norms, the bottleneck projection, `proj`, the embedding and the
output layer are called as modules, so a tensor-parallel shard (apply_tensor_parallel without
sequence parallelism) decodes with its training forward's collectives: the vocabulary-parallel
embedding and each row-parallel `proj` all-reduce; the column-parallel kernels are the rank's
channels; the output layer returns the rank's vocabulary slice. The input u is replicated over
tp, so every rank keeps the whole buffer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshlm.model.gcnn.model import GatedCNN


class ConvDecodeState:
    """Rolling buffers of up to `max_batch` sequences ("slots") for a GatedCNN (or its
    tensor-parallel shard)."""

    def __init__(self, model: GatedCNN, max_batch: int, max_len: int):
        if model.tok_embeddings is None or model.output is None:
            raise ValueError("decoding needs a whole model (not a pipeline stage)")
        info = getattr(model, "tensor_parallel", None)
        if info is not None and info.sequence_parallel:
            raise ValueError("decoding runs tensor parallelism without sequence parallelism")
        param = next(model.parameters())
        cfg = model.cfg
        self.model = model
        self.blocks = list(model.layers.values())
        self.max_batch, self.max_len = max_batch, max_len
        self.lengths = [0] * max_batch  # host side: known without a device sync
        shape = (len(self.blocks), max_batch, cfg.conv_in, cfg.kernel_size - 1)
        self.past = torch.zeros(shape, dtype=param.dtype, device=param.device)  # the model's dtype: no casts

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Append each prompt to its slot; return the logits after each prompt's last token,
        (n, V_local). The prompts run together, right-padded to the longest: padding comes after
        every real token, so the causal convolutions never see it."""
        if len(prompts) != len(slots) or not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prefill needs one non-empty prompt per slot")
        device = self.past.device
        for slot in slots:
            if self.lengths[slot] == 0:  # a fresh sequence: the causal padding
                self.past[:, slot].zero_()
        n, T, k1 = len(prompts), max(len(p) for p in prompts), self.past.shape[3]
        ids = torch.tensor([p + [0] * (T - len(p)) for p in prompts], dtype=torch.long, device=device)  # (n, T)
        ends = torch.tensor([len(p) for p in prompts], device=device)  # (n,)
        slot_ids = torch.tensor(slots, device=device)
        # the k-1 window columns that end at each row's last real input (window column k-1+t is input t)
        keep = (ends[:, None] + torch.arange(k1, device=device)).unsqueeze(1)  # (n, 1, k-1)
        h = self.model.tok_embeddings(ids)  # (n, T, d)
        for i, block in enumerate(self.blocks):
            past = self.past[i, slot_ids]  # (n, c_in, k-1)
            u = block.conv_input(h)  # (n, T, c_in)
            h = h + block.glu(u, past)  # Block.forward, continuing from the slot's past inputs
            window = torch.cat((past, u.transpose(1, 2)), dim=2)  # (n, c_in, k-1+T)
            self.past[i, slot_ids] = window.gather(2, keep.expand(n, window.shape[1], k1))
        h = h[torch.arange(n, device=device), ends - 1]  # (n, d): each prompt's last position
        for slot, prompt in zip(slots, prompts):
            self.lengths[slot] += len(prompt)
        return self.model.output(self.model.norm(h))  # (n, V_local)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token to each of the slots 0..n-1; return (n, V_local) logits."""
        logits = self.decode_static(tokens, None)
        for slot in range(tokens.shape[0]):
            self.lengths[slot] += 1
        return logits

    @torch.no_grad()
    def decode_static(self, tokens: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
        """The decode step with fixed shapes for CUDA graphs (DecodeState's optional method):
        shapes depend on n only, nothing synchronises with the host, the buffers are updated in
        place; `lengths` is left to the caller. A convolution needs no positions (ignored)."""
        n = tokens.shape[0]
        h = self.model.tok_embeddings(tokens)  # (n, d)
        for i, block in enumerate(self.blocks):
            past = self.past[i, :n]  # (n, c_in, k-1), a view: shifted in place below
            u = block.conv_input(h)  # (n, c_in)
            window = torch.cat((past, u.unsqueeze(2)), dim=2)  # (n, c_in, k)
            a, b = _one_position(block.glu, window.flatten(1))  # (n, C) each
            h = h + block.glu.proj(a * torch.sigmoid(b))  # (n, d)
            past.copy_(window[:, :, 1:])
        return self.model.output(self.model.norm(h))  # (n, V_local)

    def release(self, slot: int) -> None:
        """Forget a slot's sequence (its buffer is reset when the slot is next filled)."""
        self.lengths[slot] = 0

    def move_slot(self, src: int, dst: int) -> None:
        """Copy sequence `src` into slot `dst` (compaction after `dst` finished)."""
        if src == dst:
            return
        self.past[:, dst].copy_(self.past[:, src])
        self.lengths[dst], self.lengths[src] = self.lengths[src], 0

    def nbytes(self) -> int:
        return self.past.numel() * self.past.element_size()


def _one_position(glu: nn.Module, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """conv_a and conv_b at one position, from the flattened window of exactly k inputs
    (n, c_in * k), row-major in (c_in, k) like each kernel viewed as (C, c_in * k): a matrix
    product each. Returns a, b: (n, C) each."""
    a, b = glu.conv_a, glu.conv_b
    return F.linear(window, a.weight.flatten(1), a.bias), F.linear(window, b.weight.flatten(1), b.bias)

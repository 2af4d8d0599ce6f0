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

The state runs the model's own modules (Block.conv_input, GatedConv with `past` in place of the
padding, the final norm and output layer), so a tensor-parallel shard (made by
apply_tensor_parallel without sequence parallelism) decodes with its training forward's
collectives: the vocabulary-parallel embedding and each row-parallel projection all-reduce,
the column-parallel convolutions hold the rank's channels, the output layer returns the rank's
vocabulary slice. The input u is replicated over tp, so every rank keeps the whole buffer.
"""

from __future__ import annotations

import torch

from meshlm.model.gcnn.model import GatedCNN


class ConvDecodeState:
    """Rolling buffers of up to `max_batch` sequences ("slots") for a GatedCNN (or its
    tensor-parallel shard)."""

    def __init__(
        self,
        model: GatedCNN,
        max_batch: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
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
        self.past = torch.zeros(shape, dtype=dtype or param.dtype, device=device or param.device)

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
        n, T = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros((n, T), dtype=torch.long, device=device)
        for j, prompt in enumerate(prompts):
            ids[j, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        ends = torch.tensor([len(p) for p in prompts], device=device)  # (n,)
        logits = self._forward(ids, torch.tensor(slots, device=device), ends)
        for slot, prompt in zip(slots, prompts):
            self.lengths[slot] += len(prompt)
        return logits

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token to each of the slots 0..n-1; return (n, V_local) logits."""
        n = tokens.shape[0]
        logits = self._forward(tokens.view(n, 1), slice(0, n), None)
        for slot in range(n):
            self.lengths[slot] += 1
        return logits

    def _forward(self, ids: torch.Tensor, slots, ends: torch.Tensor | None) -> torch.Tensor:
        """The model's forward over ids (n, T) continuing each row's slot; updates the buffers.
        ends: each row's real length (None: all T, the decode step with T = 1)."""
        n, T = ids.shape
        k1 = self.past.shape[-1]  # k - 1
        h = self.model.tok_embeddings(ids)  # (n, T, d)
        for i, block in enumerate(self.blocks):
            past = self.past[i, slots]  # (n, c_in, k-1)
            u = block.conv_input(h)  # (n, T, c_in)
            h = h + block.glu(u, past)  # Block.forward, continuing from the slot's past inputs
            window = torch.cat((past, u.transpose(1, 2).to(past.dtype)), dim=2)  # (n, c_in, k-1+T)
            if ends is None:
                self.past[i, slots] = window[:, :, T:]
            else:  # the k-1 inputs that end at each row's last real token
                index = (ends[:, None] + torch.arange(k1, device=ids.device)).unsqueeze(1)  # (n, 1, k-1)
                self.past[i, slots] = window.gather(2, index.expand(n, window.shape[1], k1))
        if ends is not None:
            h = h[torch.arange(n, device=ids.device), ends - 1].unsqueeze(1)  # (n, 1, d)
        return self.model.output(self.model.norm(h))[:, -1]  # (n, V_local)

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

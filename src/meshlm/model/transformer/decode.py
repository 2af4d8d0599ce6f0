"""Incremental decoding for the transformer: the model's own forward pass against a KV cache.

    state = decode_state(model, max_batch=16, max_len=256)   # the family's DecodeState
    logits = state.prefill([[5, 9, 2], [7]], slots=[0, 1])   # (2, V): after each prompt
    logits = state.decode(torch.tensor([11, 3]))             # (2, V): one more token each

Each call is one `model(tokens, cache=self.cache)`: the model's embeddings, norms, projections,
rotary maths and MLP, exactly as in training. The cache supplies what incremental decoding
changes: the positions of the new tokens, the attention core over the cached keys and values
(`LayerCache.attend`), and which positions need logits. So the same code runs on any module
swapped in for a layer (prepacked linears, a tensor-parallel shard made by
`apply_tensor_parallel` without sequence parallelism: each rank's wk/wv produce only its own
kv heads, so its cache holds only those, and the output layer returns local logits,
(n, V_pad/tp)).

`decode_model` is the faster module tree the engine decodes with where it copies weights
anyway (CPU float32): the model's own modules, with q/k/v and the gated MLP's w1/w3 fused into
one matrix multiply each. A decode step of a small batch is a few hundred tiny operations, and
every one saved shows.

Cache layout (one tensor for keys, one for values):

    k, v    (n_layers, max_batch, n_kv_heads_local, max_len, head_dim)

A batch slot is one sequence; `lengths[slot]` tokens of it are cached. Prefill packs the
prompts of several sequences into one (1, sum T_i) row, so projections and MLPs run on real
tokens only (no padding); attention runs per prompt. Decode feeds one token for each of the
slots 0..n-1 at its own position; attention reads each slot's cache up to the longest length
in the batch and masks positions beyond the slot's own length. A step's cost depends on the
new tokens and, in attention only, on the cached length: nothing is recomputed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from meshlm.model.spec import shared_copy


class _Prefill:
    """One prefill step: prompt j is tokens [a_j, b_j) of the packed row, written to `slot_j`
    from position p0_j."""

    def __init__(self, slots: list[int], starts: list[int], sizes: list[int], device: torch.device):
        self.segments, ends = [], []
        a = 0
        for slot, p0, n in zip(slots, starts, sizes):
            # continuing a cached sequence: keys 0..p0+n-1, query t sees keys <= p0+t
            mask = None
            if p0:
                mask = torch.arange(p0 + n, device=device) <= torch.arange(p0, p0 + n, device=device).unsqueeze(1)
            self.segments.append((slot, p0, n, a, a + n, mask))
            a += n
            ends.append(a)
        self.positions = torch.cat([torch.arange(p0, p0 + n) for p0, n in zip(starts, sizes)]).to(device)[None]
        self.last = torch.tensor([b - 1 for b in ends], device=device)  # each prompt's last token

    def attend(self, kc: torch.Tensor, vc: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """q: (1, N, n_heads, head_dim); k, v: (1, N, n_kv_heads, head_dim); kc, vc: this
        layer's cache (max_batch, n_kv_heads, max_len, head_dim). Returns (1, N, n_heads, head_dim)."""
        ys = []
        for slot, p0, n, a, b, mask in self.segments:
            kc[slot, :, p0 : p0 + n] = k[0, a:b].transpose(0, 1)
            vc[slot, :, p0 : p0 + n] = v[0, a:b].transpose(0, 1)
            qj = q[:, a:b].transpose(1, 2)  # (1, n_heads, n, head_dim)
            if mask is None:  # a fresh sequence: exactly the training model's attention
                kj, vj = k[:, a:b].transpose(1, 2), v[:, a:b].transpose(1, 2)
            else:
                kj, vj = kc[slot : slot + 1, :, : p0 + n], vc[slot : slot + 1, :, : p0 + n]
            y = F.scaled_dot_product_attention(
                qj, kj, vj, attn_mask=mask, is_causal=mask is None, enable_gqa=qj.shape[1] != kj.shape[1]
            )
            ys.append(y.transpose(1, 2))  # (1, n, n_heads, head_dim)
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)

    def select(self, h: torch.Tensor) -> torch.Tensor:
        return h[0, self.last]  # (1, N, d) -> (n, d): logits only after each prompt


class _Decode:
    """One decode step: a token for each of the slots 0..n-1, slot i at position pos[i]; keys
    0..longest-1 are read, those beyond a slot's own position masked (no mask when every slot
    is at the same position `same`)."""

    def __init__(self, pos: torch.Tensor, longest: int, same: int | None = None):
        n = pos.shape[0]
        self.n, self.longest, self.same = n, longest, same
        self.pos, self.positions = pos, pos[:, None]  # (n,), (n, 1)
        self.mask = self.rows = None
        if same is None:
            self.mask = (torch.arange(longest, device=pos.device) <= self.positions).view(n, 1, 1, longest)
            self.rows = torch.arange(n, device=pos.device)

    def attend(self, kc: torch.Tensor, vc: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """q: (n, 1, n_heads, head_dim); k, v: (n, 1, n_kv_heads, head_dim). Returns (n, 1, n_heads, head_dim)."""
        n = self.n
        if self.same is not None:  # a plain slice
            kc[:n, :, self.same] = k[:, 0]
            vc[:n, :, self.same] = v[:, 0]
        else:
            kc[self.rows, :, self.pos] = k[:, 0]
            vc[self.rows, :, self.pos] = v[:, 0]
        kv_heads, head_dim = k.shape[2], k.shape[3]
        # Grouped-query attention without repeating keys: (n, kv, group, head_dim) queries.
        qg = q.view(n, kv_heads, -1, head_dim)
        keys, values = kc[:n, :, : self.longest], vc[:n, :, : self.longest]  # (n, kv, L, head_dim)
        scores = torch.matmul(qg, keys.transpose(-1, -2)).mul_(1.0 / math.sqrt(head_dim))  # (n, kv, group, L)
        if self.mask is not None:
            scores.masked_fill_(~self.mask, float("-inf"))
        probs = scores.softmax(dim=-1) if scores.dtype == torch.float32 else scores.float().softmax(-1).to(scores.dtype)
        return torch.matmul(probs, values).view(n, 1, -1, head_dim)  # (n, 1, n_heads, head_dim)

    def select(self, h: torch.Tensor) -> torch.Tensor:
        return h[:, 0]  # (n, 1, d) -> (n, d)


class LayerCache:
    """One layer's view of the cache: what `Attention.forward` calls."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        c = self.cache
        return c.step.attend(c.k[self.index], c.v[self.index], q, k, v)


class KVCache:
    """Keys and values of up to `max_batch` sequences of up to `max_len` tokens, for the blocks
    named `layer_names`; during a forward pass, the step it is running (prefill or decode)."""

    def __init__(self, layer_names, max_batch, max_len, kv_heads, head_dim, dtype, device):
        shape = (len(layer_names), max_batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.views = {name: LayerCache(self, i) for i, name in enumerate(layer_names)}
        self.step: _Prefill | _Decode | None = None

    # what the model's forward reads
    @property
    def positions(self) -> torch.Tensor:
        return self.step.positions  # (B, T) positions of the new tokens

    def layer(self, name: str) -> LayerCache:
        return self.views[name]

    def select(self, h: torch.Tensor) -> torch.Tensor:
        return self.step.select(h)


class TransformerDecodeState:
    """The transformer's DecodeState (meshlm.model.spec): a KV cache and the model that fills it."""

    def __init__(self, model: nn.Module, max_batch: int, max_len: int):
        attention = next(iter(model.layers.values())).attention
        head_dim = attention.head_dim
        kv_width = attention.wk.out_features if attention.wqkv is None else attention.qkv_sizes[1]
        kv_heads = kv_width // head_dim  # this rank's kv heads under TP
        param = next(model.parameters())
        self.model, self.device = model, param.device
        self.max_batch, self.max_len = max_batch, max_len
        self.cache = KVCache(list(model.layers), max_batch, max_len, kv_heads, head_dim, param.dtype, param.device)
        self.lengths = [0] * max_batch  # host side: known without a device sync

    def _run(self, tokens: torch.Tensor, step) -> torch.Tensor:
        self.cache.step = step
        try:
            return self.model(tokens, cache=self.cache)
        finally:
            self.cache.step = None

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        starts = [self.lengths[s] for s in slots]
        sizes = [len(p) for p in prompts]
        if any(n == 0 for n in sizes):
            raise ValueError("prefill needs at least one token per sequence")
        if any(p0 + n > self.max_len for p0, n in zip(starts, sizes)):
            raise ValueError(f"a sequence would exceed the cache length {self.max_len}")
        flat = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=self.device)[None]  # (1, N)
        logits = self._run(flat, _Prefill(slots, starts, sizes, self.device))  # (n, V_local)
        for slot, p0, n in zip(slots, starts, sizes):
            self.lengths[slot] = p0 + n
        return logits

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        lengths = self.lengths[:n]
        if max(lengths) + 1 > self.max_len:
            raise ValueError(f"a sequence would exceed the cache length {self.max_len}")
        pos = torch.tensor(lengths, dtype=torch.long).to(self.device, non_blocking=True)  # (n,)
        same = lengths[0] if min(lengths) == max(lengths) else None
        logits = self._run(tokens[:, None], _Decode(pos, max(lengths) + 1, same))  # (n, V_local)
        for s in range(n):
            self.lengths[s] += 1
        return logits

    def decode_static(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The decode step for CUDA graphs (DecodeState's optional fixed-shape step): every row
        attends over the whole cache, masked beyond its position; no host synchronisation;
        `lengths` is left to the caller."""
        return self._run(tokens[:, None], _Decode(positions, self.max_len))

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    def move_slot(self, src: int, dst: int) -> None:
        if src == dst:
            return
        n = self.lengths[src]
        self.cache.k[:, dst, :, :n].copy_(self.cache.k[:, src, :, :n])
        self.cache.v[:, dst, :, :n].copy_(self.cache.v[:, src, :, :n])
        self.lengths[dst], self.lengths[src] = n, 0

    def nbytes(self) -> int:
        return 2 * self.cache.k.numel() * self.cache.k.element_size()


def decode_state(model: nn.Module, max_batch: int, max_len: int) -> TransformerDecodeState:
    """FamilySpec.decode_state: a whole model (or its tensor-parallel shard) and an empty cache."""
    return TransformerDecodeState(model, max_batch, max_len)


def fuse_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One nn.Linear computing the outputs of `linears` (same input) side by side: a copy of
    their weights, concatenated along the output features."""
    weight = torch.cat([m.weight.detach() for m in linears])
    bias = None
    if linears[0].bias is not None:
        bias = nn.Parameter(torch.cat([m.bias.detach() for m in linears]), requires_grad=False)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight, fused.bias = nn.Parameter(weight, requires_grad=False), bias
    return fused


def decode_model(model: nn.Module) -> nn.Module:
    """FamilySpec.decode_model: a copy of `model` sharing its parameters, with each attention's
    wq, wk, wv and each gated MLP's w1, w3 fused into one linear layer (the originals dropped
    from the copy). Works on a tensor-parallel shard too: column-parallel shards fuse into this
    rank's part of the fused projection."""
    fast = shared_copy(model)
    for block in fast.layers.values():
        attention, mlp = block.attention, block.feed_forward
        projections = [attention.wq, attention.wk, attention.wv]
        attention.wqkv = fuse_linears(projections)
        attention.qkv_sizes = [m.out_features for m in projections]
        attention.wq = attention.wk = attention.wv = None
        if mlp.gated:
            mlp.w13 = fuse_linears([mlp.w1, mlp.w3])
            mlp.w1 = mlp.w3 = None
    return fast

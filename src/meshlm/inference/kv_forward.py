"""The model's forward pass with a preallocated key/value cache (inference only).

The engine runs the model's own weights and norms and replaces only the attention core,
which reads and writes the cache. Nothing in `meshlm.model.transformer` changes, and the
same code runs on a tensor-parallel shard made by `apply_tensor_parallel`:

- The matrix multiplies go through `linear_ops.Linear` (the module's weight, or a fused /
  prepacked copy of it). Column-parallel projections (wq, wk, wv, w1, w3, output) need no
  communication: the region entrance f that `apply_tensor_parallel` hooks in front of
  `attention`, `feed_forward` and `output` is the identity in forward without sequence
  parallelism (which inference never uses; see `check_inference_model`).
- Row-parallel wo and w2 all-reduce their partial products (Megatron's g) before the
  replicated bias, and the vocab-parallel token embedding (called as a module) all-reduces
  inside. So a TP shard issues exactly its training forward's collectives: 2 all-reduces
  per block and 1 for the embedding; the output layer returns local logits.
- Each rank's wk/wv produce only its own kv heads, so the cache holds only those.

Cache layout (one tensor for keys, one for values):

    k, v    (n_layers, max_batch, n_kv_heads_local, max_len, head_dim)

A batch slot is one sequence; `lengths[slot]` tokens of it are cached. Prefill packs the
prompts of several sequences into one (1, sum T_i, d) row, so projections and MLPs run on
real tokens only (no padding); attention runs per prompt. Decode feeds one token for each
of the slots 0..n-1 at its own position; attention reads each slot's cache up to the
longest length in the batch and masks positions beyond the slot's own length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from meshlm.inference.linear_ops import Linear, packing_available, row_parallel_group
from meshlm.model.transformer import Transformer, apply_rotary


class KVCache:
    """Keys and values of up to `max_batch` sequences of up to `max_len` tokens."""

    def __init__(self, model: Transformer, max_batch: int, max_len: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        block = next(iter(model.layers.values()))
        head_dim = block.attention.head_dim
        kv_heads = block.attention.wk.out_features // head_dim  # this rank's kv heads under TP
        param = next(model.parameters())
        dtype = dtype or param.dtype
        device = device or param.device
        shape = (len(model.layers), max_batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_batch, self.max_len = max_batch, max_len
        self.lengths = [0] * max_batch  # host-side: known without a device sync

    def move_slot(self, src: int, dst: int) -> None:
        """Copy sequence `src` into slot `dst` (compaction after `dst` finished)."""
        if src == dst:
            return
        n = self.lengths[src]
        self.k[:, dst, :, :n].copy_(self.k[:, src, :, :n])
        self.v[:, dst, :, :n].copy_(self.v[:, src, :, :n])
        self.lengths[dst], self.lengths[src] = n, 0

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


def check_inference_model(model: Transformer) -> None:
    """The engine handles full models and tensor-parallel shards without sequence parallelism."""
    info = getattr(model, "tensor_parallel", None)
    if info is not None and info.sequence_parallel:
        raise ValueError("inference runs tensor parallelism without sequence parallelism; "
                         "apply_tensor_parallel(model, group, sequence_parallel=False)")
    if model.tok_embeddings is None or model.output is None:
        raise ValueError("the inference engine needs a whole model (not a pipeline stage)")


class _Layer:
    """One block's weights as the engine calls them (see linear_ops)."""

    def __init__(self, block, pack: bool):
        attn, ffn = block.attention, block.feed_forward
        self.attention_norm, self.ffn_norm = block.attention_norm, block.ffn_norm
        self.head_dim = attn.head_dim
        # Fusing copies the weights: only where they are copied (prepacked) anyway.
        if pack:
            self.qkv = [Linear([attn.wq, attn.wk, attn.wv], pack)]
        else:
            self.qkv = [Linear([attn.wq], False), Linear([attn.wk], False), Linear([attn.wv], False)]
        self.wo = Linear([attn.wo], pack, row_parallel_group(attn.wo))
        self.gated = ffn.gated
        if ffn.gated:
            self.w13 = [Linear([ffn.w1, ffn.w3], pack)] if pack else [Linear([ffn.w1], False), Linear([ffn.w3], False)]
        else:
            self.w13 = [Linear([ffn.w1], pack)]
        self.w2 = Linear([ffn.w2], pack, row_parallel_group(ffn.w2))

    def qkv_proj(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        parts = [p for lin in self.qkv for p in lin.parts(lin(x))]
        q = parts[0].view(B, T, -1, self.head_dim)  # (B, T, n_heads, head_dim)
        k = parts[1].view(B, T, -1, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = parts[2].view(B, T, -1, self.head_dim)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return q, k, v

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The block's MLP (same maths as FeedForward.forward)."""
        parts = [p for lin in self.w13 for p in lin.parts(lin(x))]
        if self.gated:
            return self.w2(F.silu(parts[0]) * parts[1])
        return self.w2(F.gelu(parts[0], approximate="tanh"))


class KVModel:
    """A Transformer (or its tensor-parallel shard) run against a KVCache.

    pack: fuse and prepack the weights for oneDNN (default: where available, i.e. CPU
    float32); the weights are then copied once, here."""

    def __init__(self, model: Transformer, pack: bool | None = None):
        check_inference_model(model)
        param = next(model.parameters())
        if pack is None:
            pack = packing_available(param.device, param.dtype)
        self.model, self.pack = model, pack
        self.layers = [_Layer(block, pack) for block in model.layers.values()]
        self.output = Linear([model.output], pack)  # column-parallel under TP: local logits
        self.device = param.device

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        model = self.model
        h = model.tok_embeddings(tokens)  # (B, T, d); all-reduce inside under TP
        if model.pos_embeddings is not None:
            h = h + model.pos_embeddings(positions)
        return h

    def _rope(self, positions: torch.Tensor):
        rope = self.model.rope
        if rope is None:
            return None
        return rope.cos[positions], rope.sin[positions]  # (B, T, head_dim/2) each

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., V_local) logits of the given positions only."""
        return self.output(self.model.norm(h))

    @torch.no_grad()
    def prefill(self, cache: KVCache, prompts: list[list[int]], slots: list[int], all_logits: bool = False):
        """Append each prompt to its slot's cache (starting at the slot's current length) and
        return the logits after its last token, (n, V_local); with `all_logits` a list of
        (T_i, V_local) per prompt instead."""
        device = self.device
        starts = [cache.lengths[s] for s in slots]
        sizes = [len(p) for p in prompts]
        if any(n == 0 for n in sizes):
            raise ValueError("prefill needs at least one token per sequence")
        if any(p0 + n > cache.max_len for p0, n in zip(starts, sizes)):
            raise ValueError(f"a sequence would exceed the cache length {cache.max_len}")
        flat = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device).unsqueeze(0)  # (1, N)
        positions = torch.cat([torch.arange(p0, p0 + n) for p0, n in zip(starts, sizes)]).to(device).unsqueeze(0)
        h = self._embed(flat, positions)  # (1, N, d)
        rope = self._rope(positions)
        bounds = [0]
        for n in sizes:
            bounds.append(bounds[-1] + n)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv_proj(layer.attention_norm(h), rope)  # (1, N, heads, head_dim)
            ys = []
            for j, (slot, p0, n) in enumerate(zip(slots, starts, sizes)):
                a, b = bounds[j], bounds[j + 1]
                cache.k[i, slot, :, p0:p0 + n] = k[0, a:b].transpose(0, 1)
                cache.v[i, slot, :, p0:p0 + n] = v[0, a:b].transpose(0, 1)
                qj = q[:, a:b].transpose(1, 2)  # (1, heads, n, head_dim)
                if p0 == 0:  # a fresh sequence: exactly the training model's attention
                    kj, vj = k[:, a:b].transpose(1, 2), v[:, a:b].transpose(1, 2)
                    mask, causal = None, True
                else:  # continuing a cached sequence: keys 0..p0+n-1, query t sees keys <= p0+t
                    kj, vj = cache.k[i, slot:slot + 1, :, :p0 + n], cache.v[i, slot:slot + 1, :, :p0 + n]
                    mask = torch.arange(p0 + n, device=device) <= torch.arange(p0, p0 + n, device=device).unsqueeze(1)
                    causal = False
                y = F.scaled_dot_product_attention(qj, kj, vj, attn_mask=mask, is_causal=causal,
                                                   enable_gqa=qj.shape[1] != kj.shape[1])
                ys.append(y.transpose(1, 2).reshape(1, n, -1))
            y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)
            h = h + layer.wo(y)  # all-reduce inside under TP
            h = h + layer.mlp(layer.ffn_norm(h))
        for slot, p0, n in zip(slots, starts, sizes):
            cache.lengths[slot] = p0 + n
        if all_logits:
            logits = self._logits(h)[0]
            return [logits[bounds[j]:bounds[j + 1]] for j in range(len(prompts))]
        last = torch.tensor([b - 1 for b in bounds[1:]], device=device)
        return self._logits(h[0, last])  # (n, V_local)

    @torch.no_grad()
    def decode(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """One new token for each of the slots 0..n-1 (tokens: (n,)), each at its own position.
        Returns the next-token logits (n, V_local)."""
        n = tokens.shape[0]
        lengths = cache.lengths[:n]
        shortest, longest = min(lengths), max(lengths) + 1
        if longest > cache.max_len:
            raise ValueError(f"a sequence would exceed the cache length {cache.max_len}")
        device = self.device
        pos = torch.tensor(lengths, dtype=torch.long, device=device)  # (n,)
        positions = pos.unsqueeze(1)  # (n, 1)
        rows = torch.arange(n, device=device)
        # Keys beyond a slot's own length (other slots are longer) are masked out.
        mask = None
        if shortest + 1 != longest:
            mask = (torch.arange(longest, device=device) <= positions).view(n, 1, 1, longest)
        h = self._embed(tokens.unsqueeze(1), positions)  # (n, 1, d)
        rope = self._rope(positions)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv_proj(layer.attention_norm(h), rope)  # (n, 1, heads, head_dim)
            kc, vc = cache.k[i], cache.v[i]  # (max_batch, kv, max_len, head_dim)
            if mask is None:  # every slot at the same position: a plain slice
                kc[:n, :, shortest] = k[:, 0]
                vc[:n, :, shortest] = v[:, 0]
            else:
                kc[rows, :, pos] = k[:, 0]
                vc[rows, :, pos] = v[:, 0]
            kv_heads, head_dim = k.shape[2], k.shape[3]
            # Grouped-query attention without repeating keys: (n, kv, group, head_dim) queries.
            qg = q.view(n, kv_heads, -1, head_dim)
            keys, values = kc[:n, :, :longest], vc[:n, :, :longest]  # (n, kv, L, head_dim)
            scores = torch.matmul(qg, keys.transpose(-1, -2)).mul_(1.0 / math.sqrt(head_dim))  # (n, kv, group, L)
            if mask is not None:
                scores.masked_fill_(~mask, float("-inf"))
            y = torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(values.dtype), values)  # (n, kv, group, hd)
            h = h + layer.wo(y.reshape(n, 1, -1))
            h = h + layer.mlp(layer.ffn_norm(h))
        for s in range(n):
            cache.lengths[s] += 1
        return self._logits(h[:, 0])  # (n, V_local)

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
from meshlm.model.transformer.model import Transformer


class KVCache:
    """Keys and values of up to `max_batch` sequences of up to `max_len` tokens."""

    def __init__(
        self,
        model: Transformer,
        max_batch: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
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
        raise ValueError(
            "inference runs tensor parallelism without sequence parallelism; "
            "apply_tensor_parallel(model, group, sequence_parallel=False)"
        )
    if model.tok_embeddings is None or model.output is None:
        raise ValueError("the inference engine needs a whole model (not a pipeline stage)")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` with tables prepared by KVModel._rope: x * [cos, cos] + [x2, x1] * [-sin, sin]
    is (x1 cos - x2 sin, x2 cos + x1 sin), the same products and sums, in fewer operations."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((x2, x1), dim=-1) * sin


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
        if len(self.qkv) == 1 and rope is not None:
            # Fused: q and k are neighbours in the output, so one rotation covers both.
            heads, kv_heads = (n // self.head_dim for n in self.qkv[0].split[:2])
            y = self.qkv[0](x).view(B, T, -1, self.head_dim)  # (B, T, heads + 2 kv_heads, head_dim)
            qk = rotate(y[:, :, : heads + kv_heads], *rope)
            return qk[:, :, :heads], qk[:, :, heads:], y[:, :, heads + kv_heads :]
        parts = [p for lin in self.qkv for p in lin.parts(lin(x))]
        q = parts[0].view(B, T, -1, self.head_dim)  # (B, T, n_heads, head_dim)
        k = parts[1].view(B, T, -1, self.head_dim)  # (B, T, n_kv_heads, head_dim)
        v = parts[2].view(B, T, -1, self.head_dim)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
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
    float32); the weights are then copied once, here. cuda_graphs: replay the decode step
    from CUDA graphs (default: on a GPU, without tensor parallelism)."""

    def __init__(self, model: Transformer, pack: bool | None = None, cuda_graphs: bool | None = None):
        check_inference_model(model)
        param = next(model.parameters())
        if pack is None:
            pack = packing_available(param.device, param.dtype)
        self.model, self.pack = model, pack
        self.layers = [_Layer(block, pack) for block in model.layers.values()]
        self.output = Linear([model.output], pack)  # column-parallel under TP: local logits
        self.device = param.device
        self.rope_tables = None
        if model.rope is not None:
            cos, sin = model.rope.cos, model.rope.sin  # (max_seq_len, head_dim/2)
            self.rope_tables = (
                torch.cat([cos, cos], dim=-1).to(param.dtype),
                torch.cat([-sin, sin], dim=-1).to(param.dtype),
            )
        tp = getattr(model, "tensor_parallel", None)
        if cuda_graphs is None:
            cuda_graphs = param.device.type == "cuda" and (tp is None or tp.tp == 1)
        if cuda_graphs and param.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.graphs = CudaGraphDecode(self) if cuda_graphs else None

    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        model = self.model
        h = model.tok_embeddings(tokens)  # (B, T, d); all-reduce inside under TP
        if model.pos_embeddings is not None:
            h = h + model.pos_embeddings(positions)
        return h

    def _rope(self, positions: torch.Tensor):
        """(cos, sin) for the positions, each (B, T, 1, head_dim): the model's tables laid out
        for rotate_half, with the sign of the first half of sin folded in (see `rotate`)."""
        if self.rope_tables is None:
            return None
        cos, sin = self.rope_tables
        return cos[positions].unsqueeze(-2), sin[positions].unsqueeze(-2)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) -> (..., V_local) logits of the given positions only."""
        return self.output(self.model.norm(h))

    @torch.inference_mode()
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
                cache.k[i, slot, :, p0 : p0 + n] = k[0, a:b].transpose(0, 1)
                cache.v[i, slot, :, p0 : p0 + n] = v[0, a:b].transpose(0, 1)
                qj = q[:, a:b].transpose(1, 2)  # (1, heads, n, head_dim)
                if p0 == 0:  # a fresh sequence: exactly the training model's attention
                    kj, vj = k[:, a:b].transpose(1, 2), v[:, a:b].transpose(1, 2)
                    mask, causal = None, True
                else:  # continuing a cached sequence: keys 0..p0+n-1, query t sees keys <= p0+t
                    kj, vj = cache.k[i, slot : slot + 1, :, : p0 + n], cache.v[i, slot : slot + 1, :, : p0 + n]
                    mask = torch.arange(p0 + n, device=device) <= torch.arange(p0, p0 + n, device=device).unsqueeze(1)
                    causal = False
                y = F.scaled_dot_product_attention(
                    qj, kj, vj, attn_mask=mask, is_causal=causal, enable_gqa=qj.shape[1] != kj.shape[1]
                )
                ys.append(y.transpose(1, 2).reshape(1, n, -1))
            y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=1)
            h = h + layer.wo(y)  # all-reduce inside under TP
            h = h + layer.mlp(layer.ffn_norm(h))
        for slot, p0, n in zip(slots, starts, sizes):
            cache.lengths[slot] = p0 + n
        if all_logits:
            logits = self._logits(h)[0]
            return [logits[bounds[j] : bounds[j + 1]] for j in range(len(prompts))]
        last = torch.tensor([b - 1 for b in bounds[1:]], device=device)
        return self._logits(h[0, last])  # (n, V_local)

    @torch.inference_mode()
    def decode(self, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """One new token for each of the slots 0..n-1 (tokens: (n,)), each at its own position.
        Returns the next-token logits (n, V_local)."""
        n = tokens.shape[0]
        lengths = cache.lengths[:n]
        shortest, longest = min(lengths), max(lengths) + 1
        if longest > cache.max_len:
            raise ValueError(f"a sequence would exceed the cache length {cache.max_len}")
        pos = torch.tensor(lengths, dtype=torch.long).to(self.device, non_blocking=True)  # (n,)
        if self.graphs is not None:
            logits = self.graphs.decode(cache, tokens, pos)
        else:
            # Attend up to the longest sequence; mask only when the positions differ.
            logits = self._decode(cache, tokens, pos, longest, shortest if shortest + 1 == longest else None)
        for s in range(n):
            cache.lengths[s] += 1
        return logits

    def _decode(
        self, cache: KVCache, tokens: torch.Tensor, pos: torch.Tensor, longest: int, same_position: int | None
    ) -> torch.Tensor:
        """The decode step as tensor operations only: keys 0..longest-1 of each slot, those
        beyond the slot's own position masked (no mask when every slot is at `same_position`)."""
        n = tokens.shape[0]
        device = tokens.device
        positions = pos.unsqueeze(1)  # (n, 1)
        mask = None
        if same_position is None:
            mask = (torch.arange(longest, device=device) <= positions).view(n, 1, 1, longest)
            rows = torch.arange(n, device=device)
        h = self._embed(tokens.unsqueeze(1), positions)  # (n, 1, d)
        rope = self._rope(positions)
        for i, layer in enumerate(self.layers):
            q, k, v = layer.qkv_proj(layer.attention_norm(h), rope)  # (n, 1, heads, head_dim)
            kc, vc = cache.k[i], cache.v[i]  # (max_batch, kv, max_len, head_dim)
            if mask is None:  # every slot at the same position: a plain slice
                kc[:n, :, same_position] = k[:, 0]
                vc[:n, :, same_position] = v[:, 0]
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
            probs = (
                scores.softmax(dim=-1)
                if scores.dtype == torch.float32
                else scores.float().softmax(dim=-1).to(scores.dtype)
            )
            y = torch.matmul(probs, values)  # (n, kv, group, head_dim)
            h = h + layer.wo(y.reshape(n, 1, -1))
            h = h + layer.mlp(layer.ffn_norm(h))
        return self._logits(h[:, 0])  # (n, V_local)


class CudaGraphDecode:
    """The decode step replayed from CUDA graphs (GPU only; a speedup, never required).

    A small model's decode step on a GPU is a few hundred tiny kernels, and launching them
    from Python costs more than running them. A graph records the whole step once and
    replays it with one launch. Graphs need fixed shapes and addresses, so there is one per
    batch bucket (1, 2, 4, ... up to the cache's max_batch; a batch is padded up to its
    bucket with rows of free slots), attention always spans the whole cache with a mask,
    and the graphs belong to one cache (a new cache records new graphs). Not used under
    tensor parallelism (collectives inside graphs are left out on purpose).
    """

    def __init__(self, runner: KVModel):
        self.runner = runner
        self.cache: KVCache | None = None
        self.graphs: dict[int, tuple] = {}
        self.pool = None

    def _bucket(self, n: int, limit: int) -> int:
        b = 1
        while b < n:
            b *= 2
        return min(b, limit)

    def _capture(self, cache: KVCache, nb: int):
        device = self.runner.device
        # Warm-up and capture write position max_len-1 of slots 0..nb-1: free slots, or
        # active ones whose next write lands there anyway (this very step).
        tokens = torch.zeros(nb, dtype=torch.long, device=device)
        pos = torch.full((nb,), cache.max_len - 1, dtype=torch.long, device=device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.runner._decode(cache, tokens, pos, cache.max_len, None)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.runner._decode(cache, tokens, pos, cache.max_len, None)
        if self.pool is None:
            self.pool = graph.pool()
        return graph, tokens, pos, logits

    def decode(self, cache: KVCache, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if cache is not self.cache:
            self.cache, self.graphs, self.pool = cache, {}, None
        n = tokens.shape[0]
        nb = self._bucket(n, cache.max_batch)
        if nb not in self.graphs:
            self.graphs[nb] = self._capture(cache, nb)
        graph, static_tokens, static_pos, logits = self.graphs[nb]
        static_tokens[:n].copy_(tokens)
        static_pos[:n].copy_(pos)
        static_pos[n:].fill_(cache.max_len - 1)
        graph.replay()
        return logits[:n].clone()

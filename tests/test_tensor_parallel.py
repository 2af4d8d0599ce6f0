"""Tensor parallelism (+ sequence parallel, vocab-parallel loss) against the single-device model.

Every rank builds the full model with the same seed, runs the reference on it locally, then
shards a second copy and compares: gathered logits, the vocab-parallel loss against
F.cross_entropy on the full logits, every gathered gradient, the gathered state dict. Cases
are grouped per world size so each world starts once. float32 throughout.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from meshlm.config import ConfigError, ModelConfig
from meshlm.distributed.spawn import run_distributed
from meshlm.model.transformer import build_model, lm_loss
from meshlm.parallel.activation_checkpoint import apply_activation_checkpointing
from meshlm.parallel.tensor_parallel import (
    apply_tensor_parallel,
    gather_tp_state_dict,
    gather_tp_tensor,
    is_tp_sharded,
    shard_state_dict,
    sync_sequence_parallel_grads,
    tp_communication,
    tp_shard_dim,
)
from meshlm.parallel.tp_collectives import (
    all_gather_seq,
    copy_to_tp_region,
    gather_from_sequence_region,
    reduce_from_tp_region,
    reduce_scatter_to_sequence_region,
    scatter_to_sequence_region,
)
from meshlm.parallel.vocab_parallel import gather_vocab_logits, vocab_parallel_cross_entropy

B, T, V, SEED = 2, 8, 101, 1


def model_config(arch: str, tp: int, tied: bool = False) -> ModelConfig:
    heads, kv = (4, 2) if tp <= 2 else (8, 4)  # GQA with kv heads divisible by tp
    if arch == "gpt2":
        return ModelConfig(arch="gpt2", d_model=64, n_layers=2, n_heads=4, vocab_size=V, max_seq_len=16)
    return ModelConfig(
        arch="llama",
        d_model=64,
        n_layers=2,
        n_heads=heads,
        n_kv_heads=kv,
        vocab_size=V,
        max_seq_len=16,
        tie_embeddings=tied,
    )


CASES = [("llama", False), ("llama", True), ("gpt2", True)]


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def grads_diff(tp_model, ref_grads: dict, group) -> float:
    worst = 0.0
    for name, p in tp_model.named_parameters():
        assert p.grad is not None, name
        ref_name = name.replace("_checkpoint_wrapped_module.", "")
        worst = max(worst, max_diff(gather_tp_tensor(name, p.grad, group, V), ref_grads[ref_name]))
    return worst


def full_model_case(tp: int, arch: str, tied: bool, sp: bool, checkpointing: bool = False) -> dict:
    cfg, group = model_config(arch, tp, tied), dist.group.WORLD
    tokens, targets = data()
    ref = build_model(cfg, seed=SEED)
    full_sd = {k: v.clone() for k, v in ref.state_dict().items()}
    ref_logits = ref(tokens)
    ref_loss = lm_loss(ref_logits, targets)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    model = build_model(cfg, seed=SEED)
    apply_tensor_parallel(model, group, sequence_parallel=sp)
    if checkpointing:  # parallelize()'s order: TP, then activation checkpointing (recomputes the collectives)
        apply_activation_checkpointing(model)
    out = {"tied_kept": (model.output.weight is model.tok_embeddings.weight) == cfg.tied}
    local_logits = model(tokens)
    out["local_logits_shape"] = tuple(local_logits.shape) == (B, T, -(-V // tp) * tp // tp)
    out["logits"] = max_diff(gather_vocab_logits(local_logits, group, V), ref_logits)
    loss = vocab_parallel_cross_entropy(local_logits, targets, group, V)
    out["loss_rel"] = abs(loss.item() - ref_loss.item()) / ref_loss.item()
    loss.backward()
    sync_sequence_parallel_grads(model, group)
    out["grads"] = grads_diff(model, ref_grads, group)
    gathered = gather_tp_state_dict(model, group)
    out["state_dict_exact"] = gathered.keys() == full_sd.keys() and all(
        torch.equal(gathered[k], full_sd[k]) for k in full_sd
    )
    shards = shard_state_dict(full_sd, dist.get_rank(group), tp, V)
    out["shards_exact"] = all(torch.equal(shards[k], v) for k, v in model.state_dict().items())
    model.load_state_dict(shards)  # loads into the padded local shapes
    return out


def loss_variants(tp: int) -> dict:
    """'sum', ignore_index and non-float32 logits of the vocab-parallel loss on random logits."""
    group, rank = dist.group.WORLD, dist.get_rank()
    g = torch.Generator().manual_seed(5)
    V_pad = -(-V // tp) * tp
    full = torch.randn(B, T, V_pad, generator=g) * 3
    full[..., V:] = 1e4  # padding columns must be ignored whatever they hold
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :3] = -100
    ref_full = full[..., :V].clone().requires_grad_()
    local = full.chunk(tp, dim=-1)[rank].clone().requires_grad_()
    out, values = {}, []
    for reduction in ("sum", "mean"):
        ref = F.cross_entropy(ref_full.flatten(0, 1), targets.flatten(), reduction=reduction)
        got = vocab_parallel_cross_entropy(local, targets, group, V, reduction=reduction)
        out[f"{reduction}_rel"] = abs(got.item() - ref.item()) / abs(ref.item())
        values.append(got.item())
        (ref_grad,) = torch.autograd.grad(ref, ref_full)
        (grad,) = torch.autograd.grad(got, local)
        ref_grad_padded = torch.cat([ref_grad, ref_grad.new_zeros(B, T, V_pad - V)], dim=-1)
        out[f"{reduction}_grad"] = max_diff(grad, ref_grad_padded.chunk(tp, dim=-1)[rank])
    bf16 = vocab_parallel_cross_entropy(local.detach().bfloat16().requires_grad_(), targets, group, V)
    bf16_ref = F.cross_entropy(ref_full.bfloat16().float().flatten(0, 1), targets.flatten()).item()
    out["bf16_rel"] = abs(bf16.item() - bf16_ref) / bf16_ref  # computed in float32 from the bf16 values
    return out, values


class CommRecorder(TorchDispatchMode):
    """Records (phase, op, numel) of every c10d collective: numel of the all-reduce operand,
    the all-gather output, the reduce-scatter input (the convention of tp_communication)."""

    def __init__(self):
        super().__init__()
        self.phase, self.calls = "forward", []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == "c10d":
            if name == "allreduce_":
                self.calls.append((self.phase, "all_reduce", args[0][0].numel()))
            elif name == "_allgather_base_":
                self.calls.append((self.phase, "all_gather", args[0].numel()))
            elif name == "_reduce_scatter_base_":
                self.calls.append((self.phase, "reduce_scatter", args[1].numel()))
            else:
                self.calls.append((self.phase, name, -1))
        return func(*args, **(kwargs or {}))


def comm_counts_case(tp: int, arch: str, sp: bool) -> bool:
    cfg, group = model_config(arch, tp), dist.group.WORLD
    tokens, targets = data()
    model = build_model(cfg, seed=SEED)
    apply_tensor_parallel(model, group, sequence_parallel=sp)
    recorder = CommRecorder()
    with recorder:
        loss = vocab_parallel_cross_entropy(model(tokens), targets, group, V)
        recorder.phase = "backward"
        loss.backward()
    expected = []
    for c in tp_communication(B, T, cfg.d_model, cfg.n_layers, tp, sp):
        expected += [(c.phase, c.op.replace("all_reduce_max", "all_reduce"), c.numel)] * c.calls
    return sorted(recorder.calls) == sorted(expected)


def pipeline_stage_case(tp: int, arch: str, sp: bool) -> dict:
    """First stage (tok_embeddings, layer 0, no norm/output) returning hidden states, and a
    last stage (no embeddings, layer 1, norm + output) taking them, as pipelining cuts them."""
    cfg, group, rank = model_config(arch, tp), dist.group.WORLD, dist.get_rank()
    tokens, targets = data()
    g = torch.Generator().manual_seed(7)
    probe = torch.randn(B, T, cfg.d_model, generator=g)
    hidden_in = torch.randn(B, T, cfg.d_model, generator=g)
    local_seq = (lambda x: x.chunk(tp, dim=1)[rank]) if sp else (lambda x: x)
    out = {}

    def first(m):
        m.output, m.norm = None, None
        del m.layers["1"]
        return m

    def last(m):
        m.tok_embeddings, m.pos_embeddings = None, None
        del m.layers["0"]
        return m

    ref = first(build_model(cfg, seed=SEED))
    (ref(tokens) * probe).sum().backward()
    model = first(build_model(cfg, seed=SEED))
    apply_tensor_parallel(model, group, sequence_parallel=sp)
    h = model(tokens)
    out["first_shape"] = tuple(h.shape) == (B, T // tp if sp else T, cfg.d_model)
    out["first_hidden"] = max_diff(all_gather_seq(h.detach(), group) if sp else h, ref(tokens).detach())
    (h * local_seq(probe)).sum().backward()
    sync_sequence_parallel_grads(model, group)
    out["first_grads"] = grads_diff(model, {n: p.grad for n, p in ref.named_parameters()}, group)

    ref = last(build_model(cfg, seed=SEED))
    x_ref = hidden_in.clone().requires_grad_()
    ref_logits = ref(x_ref)
    lm_loss(ref_logits, targets).backward()
    model = last(build_model(cfg, seed=SEED))
    apply_tensor_parallel(model, group, sequence_parallel=sp)
    x = local_seq(hidden_in).clone().requires_grad_()
    local_logits = model(x)
    out["last_logits"] = max_diff(gather_vocab_logits(local_logits, group, V), ref_logits)
    vocab_parallel_cross_entropy(local_logits, targets, group, V).backward()
    sync_sequence_parallel_grads(model, group)
    out["last_grads"] = grads_diff(model, {n: p.grad for n, p in ref.named_parameters()}, group)
    out["last_input_grad"] = max_diff(x.grad, local_seq(x_ref.grad))
    return out


def collectives_case(tp: int) -> dict:
    """Each autograd function's forward and backward against the same arithmetic done locally."""
    group, rank = dist.group.WORLD, dist.get_rank()
    per_rank = [torch.randn(B, T, 3, generator=torch.Generator().manual_seed(r)) for r in range(tp)]
    grads = [torch.randn(B, T, 3, generator=torch.Generator().manual_seed(100 + r)) for r in range(tp)]
    chunk = lambda x, r=rank: x.chunk(tp, dim=1)[r]  # noqa: E731
    out = {}

    def check(name, fn, x, grad, want_y, want_grad):
        x = x.clone().requires_grad_()
        y = fn(x, group)
        y.backward(grad)
        out[name] = max(max_diff(y.detach(), want_y), max_diff(x.grad, want_grad))

    total, total_grad = sum(per_rank), sum(grads)
    check("copy", copy_to_tp_region, per_rank[0], grads[rank], per_rank[0], total_grad)
    check("reduce", reduce_from_tp_region, per_rank[rank], grads[0], total, grads[0])
    check(
        "gather",
        gather_from_sequence_region,
        chunk(per_rank[rank]),
        grads[rank],
        torch.cat([chunk(p, r) for r, p in enumerate(per_rank)], dim=1),
        chunk(total_grad),
    )
    check(
        "reduce_scatter",
        reduce_scatter_to_sequence_region,
        per_rank[rank],
        chunk(grads[rank]),
        chunk(total),
        torch.cat([chunk(gr, r) for r, gr in enumerate(grads)], dim=1),
    )
    check(
        "scatter",
        scatter_to_sequence_region,
        per_rank[0],
        chunk(grads[rank]),
        chunk(per_rank[0]),
        torch.cat([chunk(gr, r) for r, gr in enumerate(grads)], dim=1),
    )
    return out


def head_errors(rank: int) -> list[str]:
    messages = []
    for cfg in (
        ModelConfig(arch="llama", d_model=48, n_layers=1, n_heads=3, vocab_size=V),
        ModelConfig(arch="llama", d_model=64, n_layers=1, n_heads=4, n_kv_heads=1, vocab_size=V),
    ):
        try:
            apply_tensor_parallel(build_model(cfg, seed=0), dist.group.WORLD)
        except ConfigError as e:
            messages.append(str(e))
    return messages


def world(rank: int, tp: int) -> dict:
    torch.manual_seed(0)
    results = {"collectives": collectives_case(tp)}
    results["loss"], results["loss_values"] = loss_variants(tp)
    for arch, tied in CASES:
        for sp in (False, True):
            results[f"{arch}-tied{tied}-sp{sp}"] = full_model_case(tp, arch, tied, sp)
    results["llama-checkpointed-spTrue"] = full_model_case(tp, "llama", False, True, checkpointing=True)
    for arch in ("llama", "gpt2"):
        for sp in (False, True):
            results[f"stage-{arch}-sp{sp}"] = pipeline_stage_case(tp, arch, sp)
            results[f"comm-{arch}-sp{sp}"] = comm_counts_case(tp, arch, sp)
    if tp == 2:
        results["head_errors"] = head_errors(rank)
    return results


def check_world(results: list[dict]) -> None:
    assert all(r["loss_values"] == results[0]["loss_values"] for r in results)  # bitwise the same on every rank
    for r in results:
        for key, value in r.items():
            if key == "loss_values":
                continue
            if key.startswith("comm-"):
                assert value, f"{key}: collectives differ from tp_communication()"
            elif key in ("collectives", "loss"):
                for name, err in value.items():
                    tol = 1e-6 if name.endswith("_rel") else 1e-5
                    assert err <= tol, f"{key}.{name}: {err}"
            elif key.startswith(("llama", "gpt2", "stage")):
                for name, err in value.items():
                    if isinstance(err, bool):
                        assert err, f"{key}.{name}"
                    else:
                        assert err <= (1e-6 if name.endswith("_rel") else 1e-5), f"{key}.{name}: {err}"


def test_tensor_parallel_tp2():
    results = run_distributed(world, 2, 2)
    check_world(results)
    messages = results[0]["head_errors"]
    assert len(messages) == 2
    assert "model.n_heads (3)" in messages[0] and "model.n_kv_heads (3)" in messages[0] and "tp=2" in messages[0]
    assert "model.n_kv_heads (1)" in messages[1] and "tp=2" in messages[1]


def test_tensor_parallel_tp4():
    check_world(run_distributed(world, 4, 4))


# ----------------------------------------------------------------------------- single process


def test_shard_naming_rule():
    assert tp_shard_dim("layers.0.attention.wq.weight") == 0
    assert tp_shard_dim("layers.3.attention.wk.bias") == 0
    assert tp_shard_dim("layers.0.feed_forward.w3.weight") == 0
    assert tp_shard_dim("layers.0.attention.wo.weight") == 1
    assert tp_shard_dim("layers.0.feed_forward.w2.weight") == 1
    assert tp_shard_dim("tok_embeddings.weight") == 0 and tp_shard_dim("output.weight") == 0
    assert tp_shard_dim("layers.0._checkpoint_wrapped_module.feed_forward.w2.weight") == 1
    for replicated in (
        "layers.0.attention.wo.bias",
        "layers.0.feed_forward.w2.bias",
        "layers.0.attention_norm.weight",
        "layers.1.ffn_norm.bias",
        "norm.weight",
        "pos_embeddings.weight",
    ):
        assert not is_tp_sharded(replicated), replicated


@pytest.mark.parametrize("tp", [2, 3, 4])
def test_shard_state_dict_round_trip(tp):
    cfg = ModelConfig(arch="gpt2", d_model=48, n_layers=2, n_heads=6, vocab_size=V, max_seq_len=16)  # heads % 3 == 0
    full = build_model(cfg, seed=0).state_dict()
    shards = [shard_state_dict(full, r, tp, V) for r in range(tp)]
    assert shards[0]["output.weight"] is shards[0]["tok_embeddings.weight"]  # the tie survives
    assert shards[0]["tok_embeddings.weight"].shape[0] == -(-V // tp)
    for key, tensor in full.items():
        dim = tp_shard_dim(key)
        if dim is None:
            assert all(torch.equal(s[key], tensor) for s in shards)
            continue
        joined = torch.cat([s[key] for s in shards], dim=dim)
        if key in ("tok_embeddings.weight", "output.weight"):
            assert torch.count_nonzero(joined[V:]) == 0  # padding rows are zero
            joined = joined[:V]
        assert torch.equal(joined, tensor), key


def test_communication_formulas():
    """The closed forms: without and with sequence parallelism a block moves the same bytes."""
    N, tp = B * T * 64, 4
    plain = tp_communication(B, T, 64, 2, tp, False, has_embedding=False, has_output=False)
    sp = tp_communication(B, T, 64, 2, tp, True, has_embedding=False, has_output=False)
    per_block = 8 * (tp - 1) / tp * N * 4 * 2
    assert sum(c.bytes_per_rank(tp, 4) for c in plain) == pytest.approx(per_block)
    assert sum(c.bytes_per_rank(tp, 4) for c in sp) == pytest.approx(per_block)

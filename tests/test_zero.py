"""ZeRO-1/2 sharded AdamW: parity with single-process torch.optim.AdamW, exact state bytes,
state_dict round trip and resharding. float32; ranks forked per world (2 and 4).

Reference: one process, the full batch, torch.optim.AdamW (foreach; decay on dim >= 2
only, as meshlm.train.optim), torch.nn.utils.clip_grad_norm_. ZeRO: each dp rank takes its
slice of the batch (mean loss over the slice, optionally in 2 accumulated micro-batches),
gradients averaged over dp, the clip norm from an all-reduce of grad_sq_sum.
Tolerances: losses and grad norms rel 1e-5, parameters atol 1e-5 (the reductions
change the float summation order; nothing else differs).
"""

from __future__ import annotations

import functools
import io
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from meshlm.config import TrainConfig
from meshlm.distributed.spawn import run_distributed
from meshlm.model.loss import lm_loss
from meshlm.model.registry import build_model
from meshlm.model.transformer.config import TransformerConfig
from meshlm.parallel.zero import ZeroOptimizer
from meshlm.parallel.zero_state import consolidate_state_dicts
from meshlm.train.optim import lr_at

STEPS, BATCH, SEQ = 5, 8, 16
TRAIN = TrainConfig(steps=STEPS, lr=3e-3, min_lr=3e-4, warmup_steps=2, weight_decay=0.1, grad_clip=0.5)
MODELS = {
    "llama": TransformerConfig(
        arch="llama", d_model=64, n_layers=2, n_heads=4, vocab_size=101, max_seq_len=32, tie_embeddings=True
    ),
    "gpt2": TransformerConfig(arch="gpt2", d_model=64, n_layers=2, n_heads=4, vocab_size=101, max_seq_len=32),
}


class Toy(nn.Module):
    """25 parameters (odd, so dp=2 and dp=4 both pad), one matrix used twice (tied)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Linear(5, 3, bias=False)
        self.b = nn.Linear(5, 3, bias=False)
        self.b.weight = self.a.weight
        self.norm = nn.LayerNorm(3)
        self.c = nn.Linear(3, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return self.c(self.norm(self.a(x) + self.b(x * x))).squeeze(-1)


def make_model(kind: str) -> nn.Module:
    return Toy() if kind == "toy" else build_model(MODELS[kind], seed=0)


def loss_fn(kind: str, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    if kind == "toy":
        return F.mse_loss(model(batch[..., :5]), batch[..., 5])
    return lm_loss(model(batch[:, :-1]), batch[:, 1:])


@functools.cache
def data(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "toy":
        return torch.randn(STEPS, BATCH, 6, generator=g)
    return torch.randint(0, MODELS[kind].vocab_size, (STEPS, BATCH, SEQ + 1), generator=g)


@functools.cache
def reference(kind: str) -> dict:
    model = make_model(kind)
    params = list(model.parameters())  # each tied parameter once
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": TRAIN.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=TRAIN.lr,
        betas=(TRAIN.beta1, TRAIN.beta2),
        eps=1e-8,
        foreach=True,
    )
    losses, norms = [], []
    for step in range(STEPS):
        loss = loss_fn(kind, model, data(kind)[step])
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN.grad_clip).item())
        for group in opt.param_groups:
            group["lr"] = lr_at(step, TRAIN)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    names = {id(p): n for n, p in model.named_parameters()}
    state = {names[id(p)]: {k: s[k].clone() for k in ("exp_avg", "exp_avg_sq")} for p, s in opt.state.items()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"losses": losses, "norms": norms, "params": params, "state": state}


def all_references() -> dict:
    refs = {kind: reference(kind) for kind in ("llama", "gpt2", "toy")}
    assert all(max(r["norms"]) > TRAIN.grad_clip for r in refs.values()), "clipping must be exercised"
    return refs


# ----------------------------------------------------------------------------- rank side


def zero_steps(kind, model, opt, group, steps, accum=1, norm_group=None, model_zero_grad=False):
    """Train `steps` (indices into data(kind)) on this dp rank's slice; returns the global
    losses and grad norms. The clip norm is all-reduced over `norm_group` (default: dp).
    `model_zero_grad` also drops p.grad as a trainer calling model.zero_grad() would: at
    stage 1 autograd then allocates fresh gradients, which must still be reduced."""
    n, r = dist.get_world_size(group), dist.get_rank(group)
    losses, norms = [], []
    for step in steps:
        local = data(kind)[step].chunk(n)[r]
        total = torch.zeros(())
        for micro in local.chunk(accum):
            loss = loss_fn(kind, model, micro) / accum
            loss.backward()
            total += loss.detach()
        opt.reduce_gradients()
        if opt.stage == 2:  # full gradients are freed as soon as they are reduced
            assert all(p.grad is None for p in model.parameters())
        sq = opt.grad_sq_sum()
        dist.all_reduce(sq, group=norm_group or group)
        norm = sq.sqrt()
        opt.step(lr_at(step, TRAIN), (TRAIN.grad_clip / (norm + 1e-6)).clamp(max=1.0))
        opt.zero_grad()
        if model_zero_grad:
            model.zero_grad(set_to_none=True)
        dist.all_reduce(total, group=group)
        losses.append(total.item() / n)
        norms.append(norm.item())
    return losses, norms


def check_parity(kind, model, losses, norms, ref, steps=range(STEPS)):
    ref_losses = [ref["losses"][s] for s in steps]
    ref_norms = [ref["norms"][s] for s in steps]
    assert losses == pytest.approx(ref_losses, rel=1e-5), (kind, losses, ref_losses)
    assert norms == pytest.approx(ref_norms, rel=1e-5), (kind, norms, ref_norms)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref["params"][name], rtol=0, atol=1e-5, msg=f"{kind}: {name}")


def check_bytes(model, opt, stage, n):
    P = sum(p.numel() for p in model.parameters())  # parameters() skips the tied duplicate
    S = math.ceil(P / n)
    expected = {"params": 4 * n * S, "grads": 4 * n * S if stage == 1 else 4 * S, "optimizer": 2 * 4 * S}
    assert opt.state_bytes() == expected, (stage, n, P, opt.state_bytes(), expected)
    if stage == 2:
        assert all(p.grad is None for p in model.parameters())
    return P


def run_case(kind, group, stage, accum, refs, bucket_bytes=25 * 2**20, model_zero_grad=False):
    model = make_model(kind)
    opt = ZeroOptimizer(model, group, stage, TRAIN, bucket_bytes=bucket_bytes)
    losses, norms = zero_steps(kind, model, opt, group, range(STEPS), accum, model_zero_grad=model_zero_grad)
    check_parity(kind, model, losses, norms, refs[kind])
    check_bytes(model, opt, stage, dist.get_world_size(group))
    return model, opt


def world_of_2(rank, refs):
    group = dist.new_group([0, 1])
    run_case("llama", group, 1, 1, refs, model_zero_grad=True)
    run_case("llama", group, 2, 2, refs, bucket_bytes=4096)  # many buckets
    run_case("gpt2", group, 1, 2, refs, bucket_bytes=4096)
    run_case("toy", group, 2, 1, refs)

    # state_dict round trip: save after 3 steps, continue 2; a fresh model + optimizer that
    # loads the model weights and the saved shard continues bit-identically.
    model = make_model("gpt2")
    opt = ZeroOptimizer(model, group, 2, TRAIN)
    zero_steps("gpt2", model, opt, group, range(3))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buf)
    cont = zero_steps("gpt2", model, opt, group, range(3, STEPS))
    check_parity("gpt2", model, *cont, refs["gpt2"], steps=range(3, STEPS))
    buf.seek(0)
    saved = torch.load(buf)
    fresh = build_model(MODELS["gpt2"], seed=123)
    fresh_opt = ZeroOptimizer(fresh, group, 2, TRAIN)
    fresh.load_state_dict(saved["model"])  # copies into the flat buffer's views
    fresh_opt.load_state_dict(saved["optim"])
    assert zero_steps("gpt2", fresh, fresh_opt, group, range(3, STEPS)) == cont
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
    return True


def world_of_4(rank, refs):
    world = dist.new_group([0, 1, 2, 3])
    # dp=2 groups as in a (dp=2, tp=2) mesh: group ranks differ from global ranks.
    pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    pair = pairs[rank % 2]

    model, opt = run_case("llama", world, 2, 2, refs)
    # The shards, joined by name, are torch AdamW's state.
    shards = [None] * 4
    dist.all_gather_object(shards, opt.state_dict())
    full = consolidate_state_dicts(shards)
    assert full["step"] == STEPS
    for name, state in refs["llama"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            # Gradients differ from the reference by float summation order (~1e-5 of their
            # scale in the small attention/MLP moments), so compare relative to each tensor's scale.
            got, want = full["params"][name][key], state[key]
            assert got.shape == want.shape, name
            assert (got - want).abs().max() <= 1e-4 * want.abs().max(), f"{name}.{key}"
    run_case("gpt2", world, 1, 1, refs, bucket_bytes=4096)
    run_case("toy", world, 1, 2, refs, model_zero_grad=True)
    P = check_bytes(*run_case("toy", world, 2, 1, refs), 2, 4)
    assert P == 25  # S = 7, 3 padding elements

    # Reshard dp=4 -> dp=2 after 3 steps; the pair groups then behave as a (dp=2, tp=2) layout
    # whose replicated params count 1/tp each in a world-wide norm all-reduce.
    model = make_model("gpt2")
    opt = ZeroOptimizer(model, world, 1, TRAIN)
    zero_steps("gpt2", model, opt, world, range(3))
    shards = [None] * 4
    dist.all_gather_object(shards, opt.state_dict())
    moved = make_model("gpt2")
    moved.load_state_dict(model.state_dict())
    moved_opt = ZeroOptimizer(moved, pair, 2, TRAIN, grad_weight=lambda name: 0.5)
    moved_opt.load_full_state(consolidate_state_dicts(shards))
    losses, norms = zero_steps("gpt2", moved, moved_opt, pair, range(3, STEPS), norm_group=world)
    check_parity("gpt2", moved, losses, norms, refs["gpt2"], steps=range(3, STEPS))
    check_bytes(moved, moved_opt, 2, 2)
    return True


@pytest.mark.parametrize("world", [2, 4])
def test_zero_matches_single_process_adamw(world):
    refs = all_references()
    assert run_distributed(world_of_2 if world == 2 else world_of_4, world, refs) == [True] * world


def exact_against_torch_adamw(group, kind, stage):
    """dp=1, no clipping: the same gradients go into both, so the update must be bit-identical."""
    cfg = TRAIN
    ref, model = make_model(kind), make_model(kind)
    params = list(ref.parameters())
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=1e-8,
        foreach=True,
    )
    zero = ZeroOptimizer(model, group, stage, cfg)
    for step in range(3):
        for m in (ref, model):
            loss_fn(kind, m, data(kind)[step]).backward()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.step()
        opt.zero_grad()
        zero.reduce_gradients()
        zero.step(lr_at(step, cfg))
        zero.zero_grad()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_single_rank_group_is_exact_adamw_and_errors_are_clear():
    """dp=1 (no communication) is torch's AdamW bit for bit; wrong stages and foreign shards are refused."""

    def body(rank):
        group = dist.new_group([0])
        exact_against_torch_adamw(group, "llama", 1)
        exact_against_torch_adamw(group, "gpt2", 2)
        with pytest.raises(ValueError, match="stage 1 or 2"):
            ZeroOptimizer(make_model("toy"), group, 3, TRAIN)
        run_case("toy", group, 1, 1, all_references())
        model, opt = run_case("toy", group, 2, 2, all_references())
        sd = opt.state_dict()
        sd["dp_rank"] = 1
        with pytest.raises(ValueError, match="dp rank 1"):
            ZeroOptimizer(make_model("toy"), group, 2, TRAIN).load_state_dict(sd)
        with pytest.raises(RuntimeError, match="reduce_gradients"):
            opt.step(1e-3)
        return True

    assert run_distributed(body, 1) == [True]

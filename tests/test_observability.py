"""Deterministic, exact observability checks: the collective bytes per step counted by
train.profile_comm equal the closed forms of docs/parallelism.md, and the per-rank state
bytes follow the ZeRO formulas."""

from __future__ import annotations

import json
import math

import pytest

from meshlm.config import load_config
from meshlm.distributed.spawn import run_distributed
from meshlm.model.stats import count_params
from meshlm.train.trainer import train

BASE = [
    "model.d_model=64",
    "model.n_layers=2",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.vocab_size=301",
    "model.max_seq_len=64",
    "data.seq_len=32",
    "data.max_bytes=300000",
    "train.steps=2",
    "train.micro_batch=2",
    "train.global_batch=8",
    "train.eval_every=0",
    "train.sample_tokens=0",
    "train.progress=false",
    "train.profile_comm=true",
]
F32 = 4


@pytest.fixture(scope="module")
def cache(prepare_corpus):
    return prepare_corpus(BASE)


def _run(rank, cfg, out):
    train(cfg, out, log=lambda *a, **k: None)


def run_layout(cache, out, world, overrides):
    cfg = load_config(None, BASE + [f'data.cache_dir="{cache}"'] + overrides)
    run_distributed(_run, world, cfg, out)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return cfg, records[-1]["comm"], json.loads((out / "state_bytes.json").read_text())


def _param_shapes(cfg):
    from meshlm.model.registry import build_model

    return [tuple(p.shape) for p in build_model(cfg.model, seed=0).parameters()]


def padded_numel(cfg, n):
    """FSDP2 pads each parameter's first dimension to a multiple of the shard count."""
    return sum(math.ceil(s[0] / n) * n * math.prod(s[1:]) for s in _param_shapes(cfg))


def fsdp_shard_numel(cfg, n, rank):
    """Rank r holds rows [r c, (r + 1) c) of every parameter, c = ceil(rows / n): P / n up to rounding."""
    total = 0
    for s in _param_shapes(cfg):
        c = math.ceil(s[0] / n)
        total += max(0, min(c, s[0] - rank * c)) * math.prod(s[1:])
    return total


def test_ddp_bytes_and_state(cache, tmp_path):
    cfg, comm, held = run_layout(cache, tmp_path / "ddp", 2, ["parallel.dp=2", "parallel.zero=0"])
    P = count_params(cfg.model)
    # one all-reduce of every gradient per step (accumulation skips it on earlier micro-steps) + the logged loss
    assert comm["dp"]["all_reduce"]["bytes"] == F32 * P + F32
    assert comm["world"]["all_reduce"] == {"count": 1, "bytes": F32}  # the global gradient norm
    for r in held:
        assert (r["params"], r["grads"], r["optimizer"]) == (F32 * P, F32 * P, 2 * F32 * P)


def test_zero3_bytes_and_state(cache, tmp_path):
    N = 2
    cfg, comm, held = run_layout(cache, tmp_path / "fsdp", N, ["parallel.dp=2", "parallel.zero=3"])
    P_pad = padded_numel(cfg, N)
    accum = cfg.train.global_batch // (cfg.train.micro_batch * N)
    # every micro-step all-gathers each unit's shard in forward and again in backward
    assert comm["dp"]["all_gather_single"]["bytes"] == 2 * accum * F32 * P_pad // N
    # gradients are reduce-scattered once per step, on the last micro-step
    assert comm["dp"]["reduce_scatter_single"]["bytes"] == F32 * P_pad
    assert sum(fsdp_shard_numel(cfg, N, r) for r in range(N)) == count_params(cfg.model)
    for r in held:
        local = F32 * fsdp_shard_numel(cfg, N, r["rank"])
        assert (r["params"], r["grads"], r["optimizer"]) == (local, local, 2 * local)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero12_state_bytes(cache, tmp_path, stage):
    N = 2
    cfg, _, held = run_layout(cache, tmp_path / f"zero{stage}", N, ["parallel.dp=2", f"parallel.zero={stage}"])
    P = count_params(cfg.model)
    S = math.ceil(P / N)
    for r in held:
        assert r["params"] == F32 * N * S
        assert r["optimizer"] == 2 * F32 * S
        assert r["grads"] == (F32 * N * S if stage == 1 else F32 * S)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tensor_parallel_bytes(cache, tmp_path, sequence_parallel):
    """Closed forms of docs/parallelism.md, per optimizer step (accum micro-batches of B x T):
    without SP, per micro-batch (2L + 1) all-reduces of N = B T d in forward and as many in
    backward, plus the loss's all-reduces of B T (max) and 2 B T (sum-exp, target logit);
    with SP, all-gathers of N / tp (local input) and reduce-scatters of N (input) instead,
    and one all-reduce of the replicated parameters' gradients per step."""
    tp = 2
    extra = ["parallel.tp=2"] + (["parallel.sequence_parallel=true"] if sequence_parallel else [])
    cfg, comm, _ = run_layout(cache, tmp_path / "tp", tp, extra)
    m, B, T = cfg.model, cfg.train.micro_batch, cfg.data.seq_len
    accum = cfg.train.global_batch // B
    L, d = m.n_layers, m.d_model
    N = B * T * d
    loss_bytes = F32 * (B * T + 2 * B * T)
    ops = comm["tp"]
    if not sequence_parallel:
        assert ops["all_reduce"] == {
            "count": accum * (2 * (2 * L + 1) + 2),
            "bytes": accum * (2 * (2 * L + 1) * F32 * N + loss_bytes),
        }
        assert set(ops) == {"all_reduce"}
    else:
        per_micro = 4 * L + 2  # per block 2 forward + 2 backward; embedding backward; output forward
        assert ops["all_gather_single"] == {"count": accum * per_micro, "bytes": accum * per_micro * F32 * N // tp}
        assert ops["reduce_scatter_single"] == {"count": accum * per_micro, "bytes": accum * per_micro * F32 * N}
        replicated = (2 * L + 1) * d  # llama: every RMSNorm gain
        assert ops["all_reduce"] == {"count": accum * 2 + 1, "bytes": accum * loss_bytes + F32 * replicated}


def test_pipeline_bytes(cache, tmp_path):
    """pp2: per step, the first stage sends each micro-batch's activation (B T d) forward and
    receives its gradient (B T d) back; tied embeddings (gpt2) add one all-reduce of the
    embedding's gradient between the first and last stage."""
    cfg, comm, _ = run_layout(cache, tmp_path / "pp", 2, ["parallel.pp=2", 'model.arch="gpt2"', "model.n_kv_heads=0"])
    m, B, T = cfg.model, cfg.train.micro_batch, cfg.data.seq_len
    n_micro = cfg.train.global_batch // B
    activation = F32 * B * T * m.d_model
    assert comm["pp"]["isend"] == {"count": n_micro, "bytes": n_micro * activation}
    assert comm["pp"]["irecv"] == {"count": n_micro, "bytes": n_micro * activation}
    assert comm["pp-tied-embedding"]["all_reduce"] == {"count": 1, "bytes": F32 * m.vocab_size * m.d_model}


def test_trace_writes_chrome_traces_and_the_schedule_picture(cache, tmp_path):
    out = tmp_path / "trace"
    cfg = load_config(None, BASE + [f'data.cache_dir="{cache}"', "parallel.pp=2", "train.trace=true", "train.steps=3"])
    run_distributed(_run, 2, cfg, out)
    for rank in range(2):
        events = json.loads((out / "traces" / f"rank{rank}.json").read_text())["traceEvents"]
        assert any("forward" in str(e.get("name", "")).lower() or e.get("ph") == "X" for e in events)
    png = (out / "pipeline_schedule.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

"""`meshlm plan --serve`: how to serve a model on a cluster, for any family.

For each tensor-parallel degree the family can run (at most one node), the cluster holds
devices / tp replicas. Per replica:

    weights per device       the parameters one tp rank holds (family_shapes.rank_parameters,
                             the family's TP plan) x the serving dtype (bf16 on accelerators,
                             float32 on CPU)
    state per sequence       the family's own DecodeState for one more sequence of
                             prompt + generated tokens (`decode_state(...).nbytes()` on the meta
                             device: a KV cache, an LSTM's (h, c), a CNN's last inputs, an HMM's
                             filter); divided by tp where the TP plan splits hidden states
                             (regions: heads, channels), replicated where it only splits the
                             vocabulary
    largest batch            (usable memory - weights) / state per sequence
    decode step (n seqs)     max(FLOPs / GEMM rate, bytes read / memory bandwidth) + a fixed cost
                             per weight tensor + the TP all-reduces of one forward; the bytes are
                             the rank's weights plus each sequence's state; FLOPs are the spec's
                             inference FLOPs per token at the average context
    time to first token      one prompt prefilled alone, the same way
    tokens/s                 replicas x batch / decode step

The batch decoded is the largest that fits (at most --max-batch), lowered until a decode step
meets --max-tpot-ms. Candidates meeting --max-ttft-ms and --min-tokens-per-s come first,
fastest first. The decode-step prediction on cpu-local is checked against meshlm's own engine
(benchmarks/planner_serve.py, docs/benchmarks.md).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field

from meshlm.config import ConfigError, ModelConfig
from meshlm.model.registry import family_spec
from meshlm.model.stats import flops_per_token
from meshlm.model.tp_rules import layout_problem
from meshlm.plan import comm
from meshlm.plan.family_shapes import inventory, meta_model, rank_parameters
from meshlm.plan.hardware import Cluster, GiB
from meshlm.plan.report import model_json
from meshlm.plan.shapes import model_from_key, model_key

DEFAULT_MAX_BATCH = 256


@dataclass(frozen=True)
class ServeTargets:
    prompt_len: int
    gen_len: int
    max_ttft_ms: float | None = None
    min_tokens_per_s: float | None = None
    max_tpot_ms: float | None = None  # time per output token (one decode step)
    max_batch: int = DEFAULT_MAX_BATCH


@dataclass
class ServeEstimate:
    tp: int
    replicas: int
    weights_bytes: float  # per device
    state_bytes_per_sequence: float  # per device, at prompt + gen tokens
    max_batch_fits: int  # per replica
    batch: int  # sequences decoded together per replica
    decode_step_s: float
    ttft_s: float
    tokens_per_s_replica: float
    tokens_per_s: float  # the whole cluster
    fits: bool
    meets: bool
    reason: str = ""
    breakdown: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "tp": self.tp,
            "replicas": self.replicas,
            "weights_gb_per_device": self.weights_bytes / GiB,
            "state_mb_per_sequence": self.state_bytes_per_sequence / 2**20,
            "max_batch_fits": self.max_batch_fits,
            "batch": self.batch,
            "decode_step_ms": 1e3 * self.decode_step_s,
            "ttft_ms": 1e3 * self.ttft_s,
            "tokens_per_s_per_replica": self.tokens_per_s_replica,
            "tokens_per_s": self.tokens_per_s,
            "fits": self.fits,
            "meets_targets": self.meets,
            "reason": self.reason,
            "decode_step_breakdown_ms": {k: 1e3 * v for k, v in self.breakdown.items()},
        }


def state_bytes_per_sequence(m: ModelConfig, length: int) -> float:
    """Bytes the family's decode state holds for one sequence of `length` tokens (float32):
    the state of two sequences minus that of one (fixed parts cancel)."""
    spec = family_spec(m)
    if spec.decode_state is None:
        raise ConfigError(
            f"model.family '{spec.name}' has no decode state, so it cannot be served or planned for serving."
        )
    model = meta_model(m)
    return float(spec.decode_state(model, 2, length).nbytes() - spec.decode_state(model, 1, length).nbytes())


# cpu-local times the family's own decode state when the model is this small (float32 bytes);
# beyond it (a large model planned on this machine) the roofline below answers alone.
MEASURE_LIMIT_BYTES = 2 * GiB


@functools.lru_cache(maxsize=256)
def _measured_decode(mkey: tuple, n: int, prompt_len: int, context: int) -> tuple[float, float]:
    """(decode step of n sequences at `context` tokens, prefill of one `prompt_len` prompt) in
    seconds: the family's DecodeState on its own model (decode_model where it has one), on this
    machine with one thread, best of a few. The engine adds its sampling and bookkeeping."""
    import torch

    from meshlm.model.registry import build_model

    m = model_from_key(mkey)
    spec = family_spec(m)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.inference_mode():
            model = build_model(m, "cpu", seed=0).eval()
            model = spec.decode_model(model) if spec.decode_model else model
            prompt = torch.randint(0, m.vocab_size, (prompt_len,), generator=generator).tolist()
            state = spec.decode_state(model, n, context + 8)
            prefill = math.inf
            for _ in range(3):
                state.release(0)
                start = time.perf_counter()
                state.prefill([prompt], [0])
                prefill = min(prefill, time.perf_counter() - start)
            long = torch.randint(0, m.vocab_size, (context,), generator=generator).tolist()
            state.release(0)
            state.prefill([long] * n, list(range(n)))  # every sequence at the average context
            decode = math.inf
            for _ in range(5):
                start = time.perf_counter()
                state.decode(torch.zeros(n, dtype=torch.long))
                decode = min(decode, time.perf_counter() - start)
        return decode, prefill
    finally:
        torch.set_num_threads(threads)


def _params(m: ModelConfig, tp: int) -> float:
    return float(sum(rank_parameters(model_key(m), tp)[0]))


def _tp_comm(m: ModelConfig, cluster: Cluster, tp: int, n: int, tokens: int) -> float:
    """One forward's tensor-parallel all-reduces (half of training's: no backward) and the logits' gather."""
    if tp == 1:
        return 0.0
    inv = inventory(model_key(m), 128, tp)
    calls = max(1, math.ceil(inv.tp_allreduces / 2))
    per_token = inv.tp_allreduce / (2 * 128) / calls
    act = 4 if cluster.device.kind == "cpu" else 2
    group = comm.place_group(cluster, tp, 1)
    return comm.all_reduce(cluster, group, per_token * n * tokens * act, calls) + comm.all_gather(
        cluster, group, n * m.vocab_size * 4
    )


def _step(m, cluster: Cluster, tp: int, n: int, context: int, tokens: int, weights: float, state: float, tensors: int):
    """(seconds, breakdown) of one forward over `tokens` new tokens for each of n sequences.
    Weights are read once per step, as far as the sequences' tokens touch them: a matrix
    multiply reads all of its weight whatever the batch, a table look-up only the rows it
    selects (at most the spec's inference FLOPs / 2 parameters per token)."""
    dev = cluster.device
    flops = flops_per_token(m, max(1, context), False) * n * tokens / tp
    per_token = flops_per_token(m, max(1, context), False) / 2 / tp * (weights / max(1.0, _params(m, tp)))
    traffic = min(weights, n * tokens * per_token) + n * state
    bandwidth = dev.mem_bandwidth * dev.mem_efficiency if dev.kind != "cpu" else dev.elementwise_bandwidth
    fixed = tensors * (dev.gemm_overhead_s if dev.kind == "cpu" else dev.op_overhead_s)
    math_s, memory_s = flops / dev.gemm_flops, traffic / bandwidth
    tp_s = _tp_comm(m, cluster, tp, n, tokens)
    return max(math_s, memory_s) + fixed + tp_s, {
        "compute": math_s,
        "memory": memory_s,
        "fixed": fixed,
        "tp_comm": tp_s,
    }


def plan_serving(m: ModelConfig, cluster: Cluster, targets: ServeTargets) -> list[ServeEstimate]:
    spec = family_spec(m)
    dev = cluster.device
    length = targets.prompt_len + targets.gen_len
    if length > m.max_seq_len:
        raise ConfigError(
            f"prompt ({targets.prompt_len}) + generated ({targets.gen_len}) tokens = {length} exceed model.max_seq_len "
            f"({m.max_seq_len}); lower --prompt-len / --gen-len or raise model.max_seq_len."
        )
    dtype_bytes = 4 if dev.kind == "cpu" else 2
    full_state = state_bytes_per_sequence(m, length) * dtype_bytes / 4
    plan = spec.tp_plan(m) if not spec.capabilities.tensor_parallel else None
    splits_state = bool(plan and plan.regions)
    world = cluster.world_size
    if dev.kind == "cpu":
        usable = 0.9 * dev.memory_bytes / cluster.devices_per_node  # host RAM shared by the local processes
    else:
        usable = dev.memory_bytes - dev.reserve_bytes
    out = []
    for tp in [t for t in range(1, min(world, cluster.devices_per_node) + 1) if world % t == 0]:
        if layout_problem(m, tp=tp):
            continue
        numel, _, tensors, _ = rank_parameters(model_key(m), tp)
        weights = sum(numel) * dtype_bytes
        state = full_state / tp if splits_state else full_state
        free = usable - weights
        fits_batch = int(free // state) if state > 0 else targets.max_batch
        fits_batch = max(0, fits_batch)
        batch = min(fits_batch, targets.max_batch)
        context = targets.prompt_len + targets.gen_len // 2
        n_tensors = sum(tensors)
        measure = dev.kind == "cpu" and _params(m, 1) * 4 <= MEASURE_LIMIT_BYTES
        share = _params(m, tp) / _params(m, 1)

        def decode(n: int, tp=tp, weights=weights, state=state, n_tensors=n_tensors, share=share):
            if measure:  # this machine, the family's own decode state; a tp rank does its share
                measured = _measured_decode(model_key(m), n, targets.prompt_len, context)[0] * share
                tp_s = _tp_comm(m, cluster, tp, n, 1)
                return measured + tp_s, {"measured": measured, "tp_comm": tp_s}
            return _step(m, cluster, tp, n, context, 1, weights, state, n_tensors)

        step, parts = decode(max(1, batch))
        if targets.max_tpot_ms is not None:
            while batch > 1 and step * 1e3 > targets.max_tpot_ms:
                batch = max(1, batch * 3 // 4)
                step, parts = decode(batch)
        if measure:
            ttft = _measured_decode(model_key(m), 1, targets.prompt_len, context)[1] * share
            ttft += _tp_comm(m, cluster, tp, 1, targets.prompt_len)
        else:
            ttft, _ = _step(m, cluster, tp, 1, targets.prompt_len, targets.prompt_len, weights, state, n_tensors)
        replicas = world // tp
        per_replica = batch / step if batch else 0.0
        fits = batch >= 1
        problems = []
        if not fits:
            problems.append(f"weights {weights / GiB:.2f} GiB leave no room for one sequence in {usable / GiB:.2f} GiB")
        if targets.max_ttft_ms is not None and ttft * 1e3 > targets.max_ttft_ms:
            problems.append(f"time to first token {ttft * 1e3:.1f} ms > {targets.max_ttft_ms:g} ms")
        if targets.max_tpot_ms is not None and step * 1e3 > targets.max_tpot_ms:
            problems.append(f"decode step {step * 1e3:.1f} ms > {targets.max_tpot_ms:g} ms")
        if targets.min_tokens_per_s is not None and per_replica * replicas < targets.min_tokens_per_s:
            problems.append(f"{per_replica * replicas:,.0f} tokens/s < {targets.min_tokens_per_s:,.0f}")
        out.append(
            ServeEstimate(
                tp,
                replicas,
                weights,
                state,
                fits_batch,
                batch,
                step,
                ttft,
                per_replica,
                per_replica * replicas,
                fits,
                not problems,
                "; ".join(problems),
                parts,
            )
        )
    if not out:
        raise ConfigError(
            f"no tensor-parallel degree of model.family '{spec.name}' divides {world} devices within a node "
            f"({cluster.devices_per_node} per node); {spec.capabilities.supported()}."
        )
    return sorted(out, key=lambda e: (not e.meets, not e.fits, -e.tokens_per_s, e.ttft_s))


def format_serving(m: ModelConfig, cluster: Cluster, targets: ServeTargets, rows: list[ServeEstimate]) -> str:
    spec = family_spec(m)
    wanted = [
        f"{k} {v:g}"
        for k, v in (
            ("TTFT <= ms", targets.max_ttft_ms),
            ("tokens/s >=", targets.min_tokens_per_s),
            ("decode step <= ms", targets.max_tpot_ms),
        )
        if v is not None
    ]
    lines = [
        f"meshlm plan --serve: {m.family} ({spec.describe(m)}) on {cluster.describe()}; prompt {targets.prompt_len} "
        f"+ {targets.gen_len} generated tokens; targets: {', '.join(wanted) or 'none'}",
        f"{'tp':>3} {'replicas':>8} {'weights GiB':>11} {'state MiB/seq':>13} {'max batch':>9} {'batch':>5} "
        f"{'step ms':>8} {'TTFT ms':>8} {'tokens/s':>10}  meets",
    ]
    for e in rows:
        lines.append(
            f"{e.tp:>3} {e.replicas:>8} {e.weights_bytes / GiB:>11.3g} {e.state_bytes_per_sequence / 2**20:>13.3g} "
            f"{e.max_batch_fits:>9} {e.batch:>5} {1e3 * e.decode_step_s:>8.3g} {1e3 * e.ttft_s:>8.3g} "
            f"{e.tokens_per_s:>10,.0f}  {'yes' if e.meets else 'no: ' + e.reason}"
        )
    best = rows[0]
    if best.meets:
        lines.append(
            f"Best: tp={best.tp} x {best.replicas} replica(s), batch {best.batch} per replica: "
            f"{best.tokens_per_s:,.0f} tokens/s, {1e3 * best.ttft_s:.3g} ms to the first token."
        )
    else:
        lines.append(f"No layout meets the targets; the closest, tp={best.tp}: {best.reason}.")
    return "\n".join(lines)


def serving_json(m: ModelConfig, cluster: Cluster, targets: ServeTargets, rows: list[ServeEstimate]) -> dict:
    return {
        "model": model_json(m),
        "cluster": cluster.to_dict(),
        "prompt_len": targets.prompt_len,
        "gen_len": targets.gen_len,
        "targets": {
            "max_ttft_ms": targets.max_ttft_ms,
            "min_tokens_per_s": targets.min_tokens_per_s,
            "max_tpot_ms": targets.max_tpot_ms,
            "max_batch": targets.max_batch,
        },
        "candidates": [e.to_dict() for e in rows],
    }

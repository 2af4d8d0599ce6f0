"""The `cpu-local` preset: this machine's processes, measured by a micro-benchmark.

What is measured (one thread per process, as meshlm's local ranks run; each figure is the
best of several repetitions, so that other programs on the machine disturb it less):

    GEMM              forward + backward of linear layers at five sizes, fitted to
                      t = 3 (2 M K N / rate + overhead): the matmul rate and the fixed cost per GEMM
    per-op cost       forward + backward of a chain of tiny autograd ops
    elementwise       the elementwise work of a reference llama block (norms, rotary, SwiGLU
                      product, residual adds, the context copy; forward + backward) run as meshlm
                      runs it: the cost model's bytes for it over its time give the bandwidth
    cross-entropy     a narrow output layer + meshlm's loss, less its GEMM: seconds per logit
    attention         causal scaled_dot_product_attention forward + backward at two shapes:
                      the rate and the cost per query row
    gloo              cpu_collectives.py: each collective's latency and bandwidth, and the
                      in-situ cost for 2, 4, 8 (and cores, 2 x cores) processes

It takes about 4 s. The result is cached in a JSON file under the user's cache directory
($MESHLM_CACHE_DIR, else $XDG_CACHE_HOME/meshlm, else ~/.cache/meshlm), keyed by machine
(host name, CPU model, core count, torch version), so it runs once per machine. A busy machine
gives pessimistic figures: `meshlm plan --cluster cpu-local --remeasure` measures again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

from meshlm.distributed.env import environment_without_launch
from meshlm.plan.cpu_collectives import measure_collectives
from meshlm.plan.hardware import Cluster, Device, Link

VERSION = 11


def cache_dir() -> Path:
    if os.environ.get("MESHLM_CACHE_DIR"):
        return Path(os.environ["MESHLM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meshlm"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _host_memory() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def machine_key() -> str:
    import torch

    text = f"{platform.node()}|{_cpu_model()}|{cores()}|{torch.__version__}|v{VERSION}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path() -> Path:
    return cache_dir() / f"cpu-local-{machine_key()}.json"


# ----------------------------------------------------------------------------- measuring


def _best(fn, repeat: int, inner: int = 1) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def _measure_compute() -> dict:
    import torch
    import torch.nn.functional as F

    out: dict = {}
    # GEMM: forward + backward of a linear layer = 3 GEMMs of 2 M K N FLOPs. As in a training step,
    # where each layer's operands were evicted by the layers in between, the layers cycle through
    # distinct operands (over 8 MB, beyond a core's cache).
    points = []
    for M, K, N in ((256, 64, 64), (512, 128, 128), (512, 128, 512), (512, 512, 128), (512, 384, 384)):
        copies = max(2, (8 << 20) // (4 * (M * K + N * K + M * N)))
        sets = [
            (torch.randn(M, K, requires_grad=True), torch.randn(N, K, requires_grad=True), torch.randn(M, N))
            for _ in range(copies)
        ]

        def step():
            for x, w, grad in sets:  # grad: a dense output gradient, as in training
                F.linear(x, w).backward(grad)
                x.grad = None
                w.grad = None

        points.append((3 * 2 * M * K * N, _best(step, 5, 1) / copies))
    # least squares for t = f / rate + 3 t0 (relative errors: weight by 1/t)
    sw = sum(1 / t**2 for _, t in points)
    sf = sum(f / t**2 for f, t in points)
    sff = sum(f * f / t**2 for f, t in points)
    st = sum(1 / t for _, t in points)
    sft = sum(f / t for f, t in points)
    det = sw * sff - sf * sf
    c0 = (st * sff - sf * sft) / det  # 3 t0
    c1 = (sw * sft - sf * st) / det  # 1 / rate
    if c1 <= 0:
        c1, c0 = points[-1][1] / points[-1][0], 0.0
    out["gemm_flops"] = 1 / c1
    out["gemm_overhead_s"] = max(0.0, c0 / 3)
    # elementwise bandwidth: r + r + w of float32 elements
    for label, n in (("small", 1 << 16), ("large", 1 << 22)):
        a, b, c = torch.randn(n), torch.randn(n), torch.empty(n)
        t = _best(lambda: torch.mul(a, b, out=c), 7, 5 if n > 1 << 20 else 50)
        out[f"bandwidth_{label}"] = 3 * 4 * n / t
    # per-op overhead with autograd: forward + backward of a chain of tiny ops
    x = torch.randn(16, requires_grad=True)
    n_ops = 20

    def chain():
        y = x
        for _ in range(n_ops):
            y = y * 1.0001
        y.sum().backward()
        x.grad = None

    out["op_overhead_s"] = _best(chain, 7, 5) / (2 * n_ops + 2)
    # cross-entropy over logits, cycling through 8 buffers (32 MB) so that, as in training, the
    # logits are not already in the cache
    M, V = 512, 2048
    buffers = [torch.randn(M, V, requires_grad=True) for _ in range(8)]
    target = torch.randint(0, V, (M,))

    def ce():
        for logits in buffers:
            F.cross_entropy(logits.float(), target).backward()
            logits.grad = None

    out["softmax_s_per_element"] = max(0.0, _best(ce, 5, 1) / 8 - 8 * out["op_overhead_s"]) / (M * V)
    # causal attention forward + backward: t = real work / rate + rows x per-row cost, from two shapes
    # (real work = 3.5 x half of 4 B H T^2 hd; rows = B H T), as for the GPU presets
    points = []
    for B, H, T, hd in ((8, 4, 64, 32), (2, 4, 256, 32)):
        q, k, v = (torch.randn(B, H, T, hd, requires_grad=True) for _ in range(3))
        grad = torch.randn(B, H, T, hd)

        def attn():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
            for t in (q, k, v):
                t.grad = None

        points.append((3.5 * 2 * B * H * T * T * hd, B * H * T, _best(attn, 7, 3)))
    (f1, r1, t1), (f2, r2, t2) = points
    det = f1 * r2 - f2 * r1
    inv_rate = (t1 * r2 - t2 * r1) / det
    row = (f1 * t2 - f2 * t1) / det
    if inv_rate <= 0 or row < 0:  # noisy: one rate through both points
        inv_rate, row = (t1 + t2) / (f1 + f2), 0.0
    out["attention_flops"] = 1 / inv_rate
    out["attention_row_s"] = row
    out.update(_measure_reference_block())
    return out


# The reference shapes: one llama block and the output layer + loss, timed as a whole so that
# the elementwise work between the GEMMs (norms, rotary, activations, residual adds, their
# backward) and the cross-entropy are measured as meshlm runs them, caches included.
REFERENCE = dict(arch="llama", d_model=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=4096, max_seq_len=128)
REFERENCE_BATCH = 4


def _measure_reference_block() -> dict:
    """The reference transformer block's elementwise work and head, timed by the transformer
    family's own calibration routine (it runs the family's norms, rotary and activations)."""
    from meshlm.config import model_section
    from meshlm.model.registry import family_spec

    cfg = model_section("transformer")(**REFERENCE)
    return family_spec("transformer").calibrate(cfg, REFERENCE_BATCH)


def measure(log=None) -> dict:
    """Run the micro-benchmark (a few seconds) and return the figures as a dict."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        figures = _measure_compute()
        figures["collectives"] = measure_collectives(cores())
    finally:
        torch.set_num_threads(threads)
    figures.update(
        {
            "cores": cores(),
            "memory_bytes": _host_memory(),
            "cpu": _cpu_model(),
            "host": platform.node(),
            "torch": torch.__version__,
            "version": VERSION,
            "seconds": time.perf_counter() - started,
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
    )
    if log:
        ar = figures["collectives"]["2"]["2"]["all_reduce"][1]
        log(
            f"cpu-local: measured this machine in {figures['seconds']:.1f} s: matmul {figures['gemm_flops'] / 1e9:.1f} GFLOP/s "
            f"per core, gloo all-reduce between 2 processes {ar[0] * 1e6:.0f} us + {1e-9 / ar[1]:.2f} GB/s "
            f"(cached in {cache_path()})"
        )
    return figures


def load_or_measure(remeasure: bool = False, log=None) -> dict:
    path = cache_path()
    if not remeasure and path.is_file():
        try:
            figures = json.loads(path.read_text())
            if figures.get("version") == VERSION:
                return figures
        except (OSError, ValueError):
            pass
    if log:
        log("cpu-local: measuring this machine (once; a few seconds)...")
    if _inside_process_group():
        return _measure_in_subprocess(path)
    figures = measure(log=log)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(figures, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # an unwritable cache only costs a re-measurement next time
    return figures


def _inside_process_group() -> bool:
    import sys

    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def _measure_in_subprocess(path: Path) -> dict:
    """The gloo measurement forks ranks that start their own process group, which a process that
    already has one (a training rank planning parallel = "auto") cannot do: measure in a fresh
    interpreter, then read its cache file."""
    import subprocess
    import sys

    env = environment_without_launch()
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    )
    subprocess.run(
        [sys.executable, "-c", "from meshlm.plan.cpu_local import load_or_measure; load_or_measure(True)"],
        env=env,
        check=True,
    )
    return json.loads(path.read_text())


def device_from_figures(f: dict) -> Device:
    """The cpu-local device: measured rates, with the elementwise bandwidth and the cross-entropy
    cost per logit chosen so that the cost model reproduces the reference block and head timings."""
    device = _raw_device(f)
    if "reference_block_s" in f:
        device = _calibrate(device, f)
    return device


def _raw_device(f: dict) -> Device:
    return Device(
        name=f"CPU process ({f['cpu']})",
        kind="cpu",
        peak_flops=f["gemm_flops"],
        memory_bytes=f["memory_bytes"],
        # a step's activations (tens of MB) do not stay in a core's cache: the streaming rate applies
        mem_bandwidth=f["bandwidth_large"],
        gemm_efficiency=1.0,
        gemm_overhead_s=f["gemm_overhead_s"],
        attention_efficiency=f["attention_flops"] / f["gemm_flops"],
        attention_row_s=f["attention_row_s"],
        mem_efficiency=1.0,
        reduction_efficiency=1.0,
        op_overhead_s=f["op_overhead_s"],
        host_op_overhead_s=0.0,
        softmax_s_per_element=f["softmax_s_per_element"],
        reserve_bytes=0.0,
        cores=int(f["cores"]),
    )


def _calibrate(device: Device, f: dict) -> Device:
    """Elementwise bandwidth and cross-entropy cost from the reference timings: the bytes and
    kernels the cost model counts for the reference block's elementwise work, over the time it
    took; the head's time beyond its GEMM and norm, per logit."""
    from dataclasses import replace

    from meshlm.config import model_section
    from meshlm.plan.compute import block_elementwise
    from meshlm.plan.layout import Layout, Workload, meshlm_software

    workload = Workload(model_section("transformer")(**REFERENCE), REFERENCE_BATCH, REFERENCE["max_seq_len"])
    ew = block_elementwise(workload, Layout(micro_batch=REFERENCE_BATCH), meshlm_software("cpu"))
    rest = f["reference_elementwise_s"] - (ew.fwd_ops + ew.bwd_ops) * device.op_overhead_s
    if rest > 0:
        device = replace(device, mem_bandwidth=(ew.fwd + ew.fwd_reduce + ew.bwd + ew.bwd_reduce) / rest)
    logits = REFERENCE_BATCH * REFERENCE["max_seq_len"] * REFERENCE["vocab_size"]
    norm = REFERENCE_BATCH * REFERENCE["max_seq_len"] * 32 * 4 * 7 / device.mem_bandwidth
    rest = f["reference_head_s"] - f["reference_head_gemm_s"] - norm - 9 * device.op_overhead_s
    if rest > 0:
        device = replace(device, softmax_s_per_element=rest / logits)
    return device


def cluster_from_figures(f: dict, n: int) -> Cluster:
    ar = f["collectives"]["2"]["2"]["all_reduce"][1]  # large messages, p = 2 ring: 2 alpha + n / rate
    link = Link(1 / ar[1], ar[0] / 2, 1.0)
    measured_id = hashlib.sha256(json.dumps(f["collectives"], sort_keys=True).encode()).hexdigest()[:16]
    return Cluster(
        "cpu-local",
        device_from_figures(f),
        1,
        n,
        link,
        link,
        measured_collectives=f["collectives"],
        measured_id=measured_id,
        notes=f"measured {f.get('measured_at', '')} on {f.get('host', '')}: {f['cores']} cores",
    )


def cpu_local_cluster(n: int, remeasure: bool = False, log=None) -> Cluster:
    """`n` local processes on this machine (measured once, then read from the cache)."""
    return cluster_from_figures(load_or_measure(remeasure, log), n)

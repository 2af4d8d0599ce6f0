"""The `cpu-local` preset: this machine's processes, measured by a micro-benchmark.

What is measured (one thread per process, as meshlm's local ranks run; each figure is the
best of several repetitions, so that other programs on the machine disturb it less):

    GEMM              forward + backward of a linear layer at a few sizes, fitted to
                      t = 3 (2 M K N / rate + overhead): the matmul rate and the fixed cost per GEMM
    elementwise       a multiply over 64K and 4M float32 elements: bandwidth and the per-op cost
                      (with autograd: forward + backward of a chain of tiny ops)
    cross-entropy     log-softmax + NLL forward + backward over (512, 2048) logits: seconds per logit
    attention         causal scaled_dot_product_attention forward + backward
    gloo              all-reduce between 2 forked local processes (4 KB and 4 MB): latency and
                      bandwidth of the ring model; send/recv likewise

It takes a few seconds. The result is cached in a JSON file under the user's cache directory
($MESHLM_CACHE_DIR, else $XDG_CACHE_HOME/meshlm, else ~/.cache/meshlm), keyed by machine
(host name, CPU model, core count, torch version), so it runs once per machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

from meshlm.plan.hardware import Cluster, Device, Link

VERSION = 1


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
    # GEMM: forward + backward of a linear layer = 3 GEMMs of 2 M K N FLOPs
    points = []
    for M, K, N in ((256, 64, 64), (512, 128, 128), (512, 128, 512), (512, 512, 128), (512, 384, 384)):
        x = torch.randn(M, K, requires_grad=True)
        w = torch.randn(N, K, requires_grad=True)

        def step():
            F.linear(x, w).sum().backward()
            x.grad = None
            w.grad = None

        sum_t = _best(lambda: torch.randn(M, N).sum(), 3, 5)  # the .sum() and its gradient, not GEMM work
        points.append((3 * 2 * M * K * N, max(1e-7, _best(step, 5, 3) - 2 * sum_t)))
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
    # cross-entropy over logits
    M, V = 512, 2048
    logits = torch.randn(M, V, requires_grad=True)
    target = torch.randint(0, V, (M,))

    def ce():
        F.cross_entropy(logits.float(), target).backward()
        logits.grad = None

    out["softmax_s_per_element"] = max(0.0, _best(ce, 7, 3) - 8 * out["op_overhead_s"]) / (M * V)
    # causal attention forward + backward; real work = 3.5 x (half of 4 B H T^2 hd)
    rates = []
    for B, H, T, hd in ((4, 4, 128, 32), (2, 8, 256, 64)):
        q, k, v = (torch.randn(B, H, T, hd, requires_grad=True) for _ in range(3))

        def attn():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            for t in (q, k, v):
                t.grad = None

        rates.append(3.5 * 2 * B * H * T * T * hd / _best(attn, 5, 3))
    out["attention_flops"] = (rates[0] * rates[1]) ** 0.5
    return out


def _gloo_rank(rank: int, sizes: tuple[int, ...], repeat: int) -> dict:
    import torch
    import torch.distributed as dist

    results = {}
    for n in sizes:
        t = torch.zeros(n // 4)
        best = float("inf")
        for _ in range(repeat):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(5):
                dist.all_reduce(t)
            best = min(best, (time.perf_counter() - start) / 5)
        results[f"all_reduce_{n}"] = best
        best = float("inf")
        for _ in range(repeat):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(5):
                if rank == 0:
                    dist.send(t, 1)
                    dist.recv(t, 1)
                else:
                    dist.recv(t, 0)
                    dist.send(t, 0)
            best = min(best, (time.perf_counter() - start) / 10)
        results[f"send_recv_{n}"] = best
    return results


def _measure_gloo() -> dict:
    from meshlm.distributed.spawn import run_distributed

    small, large = 4096, 4 << 20
    r = run_distributed(_gloo_rank, 2, (small, large), 5, timeout=120)[0]
    # p = 2 ring: all-reduce = 2 alpha + n / rate
    rate = (large - small) / max(1e-9, r[f"all_reduce_{large}"] - r[f"all_reduce_{small}"])
    alpha = max(1e-6, (r[f"all_reduce_{small}"] - small / rate) / 2)
    p2p_rate = (large - small) / max(1e-9, r[f"send_recv_{large}"] - r[f"send_recv_{small}"])
    p2p_alpha = max(1e-6, r[f"send_recv_{small}"] - small / p2p_rate)
    return {"link_rate": rate, "link_alpha_s": alpha, "p2p_rate": p2p_rate, "p2p_alpha_s": p2p_alpha, "raw": r}


def measure(log=None) -> dict:
    """Run the micro-benchmark (a few seconds) and return the figures as a dict."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        figures = _measure_compute()
        figures.update(_measure_gloo())
    finally:
        torch.set_num_threads(threads)
    figures.update({"cores": cores(), "memory_bytes": _host_memory(), "cpu": _cpu_model(), "host": platform.node(),
                    "torch": torch.__version__, "version": VERSION, "seconds": time.perf_counter() - started,
                    "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")})
    if log:
        log(f"cpu-local: measured this machine in {figures['seconds']:.1f} s: matmul {figures['gemm_flops'] / 1e9:.1f} GFLOP/s "
            f"per core, gloo all-reduce {figures['link_alpha_s'] * 1e6:.0f} us + {figures['link_rate'] / 1e9:.2f} GB/s")
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
    figures = measure(log=log)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(figures, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # an unwritable cache only costs a re-measurement next time
    return figures


def device_from_figures(f: dict) -> Device:
    return Device(
        name=f"CPU process ({f['cpu']})", kind="cpu", peak_flops=f["gemm_flops"], memory_bytes=f["memory_bytes"],
        mem_bandwidth=f["bandwidth_small"], gemm_efficiency=1.0, gemm_overhead_s=f["gemm_overhead_s"],
        attention_efficiency=f["attention_flops"] / f["gemm_flops"], mem_efficiency=1.0,
        op_overhead_s=f["op_overhead_s"], host_op_overhead_s=0.0, softmax_s_per_element=f["softmax_s_per_element"],
        reserve_bytes=0.0, cores=int(f["cores"]),
    )


def cluster_from_figures(f: dict, n: int) -> Cluster:
    link = Link(f["link_rate"], f["link_alpha_s"], 1.0)
    return Cluster("cpu-local", device_from_figures(f), 1, n, link, link,
                   notes=f"measured {f.get('measured_at', '')} on {f.get('host', '')}: {f['cores']} cores")


def cpu_local_cluster(n: int, remeasure: bool = False, log=None) -> Cluster:
    """`n` local processes on this machine (measured once, then read from the cache)."""
    return cluster_from_figures(load_or_measure(remeasure, log), n)

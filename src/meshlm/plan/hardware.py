"""Devices, links and clusters: the hardware side of the cost model.

A cluster is `nodes` x `devices_per_node` identical devices. Devices of one node talk over
the `intra` link (NVLink / NVSwitch; loopback TCP for cpu-local), devices of different
nodes over the `inter` link (InfiniBand / RoCE), one network port's share per device.

Every GPU constant is a published hardware figure (datasheet peak, link speed) times an
efficiency that says how much of it real kernels and NCCL reach; docs/planner.md lists
where each comes from. `cpu-local` is measured on the spot (meshlm.plan.cpu_local).

Users describe their own cluster in TOML (see `load_cluster_file`):

    name = "my-cluster"
    nodes = 4
    devices_per_node = 8
    [device]
    preset = "h100-sxm"        # start from a preset device, then override fields
    memory_gb = 94
    [intra]                    # link between the devices of one node
    bandwidth_gbps = 450       # GB/s per device and direction
    latency_us = 3
    [inter]                    # link between nodes, per device
    bandwidth_gbps = 50
    latency_us = 6
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from meshlm.config import ConfigError

GB = 1e9
GiB = 2**30
TFLOPS = 1e12


@dataclass(frozen=True)
class Device:
    """One accelerator (or one CPU process). Rates are what kernels sustain, not peaks:
    `peak_flops * gemm_efficiency` is the large-GEMM rate."""

    name: str
    kind: str  # "gpu" or "cpu"
    peak_flops: float  # dense matmul FLOP/s in the training dtype (bf16 on GPUs, fp32 on CPU)
    memory_bytes: float  # usable device memory (host RAM for cpu: shared by all local ranks)
    mem_bandwidth: float  # bytes/s of device memory (datasheet)
    gemm_efficiency: float = 0.8  # fraction of peak a large GEMM sustains
    gemm_overhead_s: float = 8e-6  # fixed cost per GEMM (launch, ramp-up, tail wave): t = flops/rate + this
    attention_efficiency: float = 0.5  # flash attention fwd+bwd, fraction of peak (causal work counted)
    attention_row_s: float = 1.6e-9  # flash attention's fixed cost per query row and head (fwd + bwd)
    mem_efficiency: float = 0.85  # fraction of mem_bandwidth elementwise kernels reach
    reduction_efficiency: float = 0.60  # ... and row-reduction kernels (norms, softmax, bias gradients)
    op_overhead_s: float = 5e-6  # per non-GEMM kernel launch (device side) / per op (cpu)
    host_op_overhead_s: float = 17e-6  # eager PyTorch dispatch per op on the host (GPU: overlaps device work)
    softmax_s_per_element: float = 0.0  # cpu only: measured log-softmax fwd+bwd cost per element (0: memory-bound)
    reserve_bytes: float = 3 * GiB  # CUDA context, NCCL and cuBLAS workspaces, allocator fragmentation
    cores: int = 0  # cpu only: physical cores shared by the local ranks
    fp32_peak_flops: float = 0.0  # GPUs: float32 without tensor cores (training in train.dtype = float32)

    @property
    def gemm_flops(self) -> float:
        return self.peak_flops * self.gemm_efficiency

    def in_float32(self) -> Device:
        """The device computing in float32 (no tensor cores): its float32 peak, same efficiencies."""
        if self.kind != "gpu" or not self.fp32_peak_flops:
            return self
        return replace(self, peak_flops=self.fp32_peak_flops)

    @property
    def attention_flops(self) -> float:
        return self.peak_flops * self.attention_efficiency

    @property
    def elementwise_bandwidth(self) -> float:
        return self.mem_bandwidth * self.mem_efficiency

    @property
    def reduction_bandwidth(self) -> float:
        return self.mem_bandwidth * self.reduction_efficiency


@dataclass(frozen=True)
class Link:
    """A bandwidth-latency (alpha-beta) link: a transfer of n bytes costs latency + n / rate."""

    bandwidth: float  # bytes/s per device and direction (datasheet)
    latency_s: float  # per message / per ring step
    efficiency: float = 0.8  # fraction of `bandwidth` NCCL (or gloo) collectives reach

    @property
    def rate(self) -> float:
        return self.bandwidth * self.efficiency


@dataclass(frozen=True)
class Cluster:
    name: str
    device: Device
    nodes: int
    devices_per_node: int
    intra: Link
    inter: Link
    # cpu-local: collective costs measured per process count and group size,
    # {"world": {"p": {"all_reduce" | "all_gather" | "reduce_scatter" | "send_recv": [alpha_s, s_per_byte]}}}.
    # Empty: the ring formulas on the links.
    measured_collectives: dict = field(default_factory=dict, compare=False, hash=False)
    measured_id: str = ""  # identifies the measurement (clusters compare and hash by it)
    # cpu-local: processes computing at once when it differs from the world size (a pipeline's
    # ranks idle in its bubble); the measured collective costs are interpolated to it. 0: all.
    active_processes: float = 0.0
    notes: str = ""

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    def describe(self) -> str:
        return f"{self.name}: {self.nodes} node(s) x {self.devices_per_node} {self.device.name}"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "nodes": self.nodes,
            "devices_per_node": self.devices_per_node,
            "device": dataclasses.asdict(self.device),
            "intra": dataclasses.asdict(self.intra),
            "inter": dataclasses.asdict(self.inter),
        }


# ----------------------------------------------------------------------------- presets

# Datasheet figures (NVIDIA A100 / H100 / H200 datasheets): dense bf16 tensor-core peak, HBM
# capacity and bandwidth. The efficiencies are measured kernel rates, not fitted to training runs:
#   H100: measured on an H100 SXM 80GB here (benchmarks/planner_accuracy.py gpu, docs/planner.md):
#     GEMMs of LLM shapes fit t = flops / (0.75 peak) + 8 us (a square 8192^3 reaches 0.81,
#     the "maximum achievable matmul FLOPS" S. Bekman reports for H100 SXM: ~0.80);
#     cuDNN flash attention fwd+bwd fits t = flops / (0.57 peak) + 1.75 ns per query row and head;
#     a bf16 add streams at 0.91 of HBM bandwidth, RMSNorm at 0.60; eager dispatch 17 us per op.
#   A100: not measured here. GEMM: Bekman's maximum achievable 0.86 of peak, times the typical-shape /
#     maximum ratio measured on the H100 (0.94): 0.80. Flash attention: FlashAttention-2's published
#     fwd+bwd rates on A100 (Dao 2023: ~110 TFLOP/s at 512 tokens to ~190 at 16k, head size 128)
#     fit 0.64 of peak + 1.6 ns per row.
DEVICES: dict[str, Device] = {
    "a100-40gb": Device(
        "A100 SXM 40GB",
        "gpu",
        312 * TFLOPS,
        40 * GiB,
        1555 * GB,
        gemm_efficiency=0.80,
        gemm_overhead_s=8e-6,
        attention_efficiency=0.64,
        attention_row_s=1.6e-9,
        fp32_peak_flops=19.5 * TFLOPS,
    ),
    "a100-80gb": Device(
        "A100 SXM 80GB",
        "gpu",
        312 * TFLOPS,
        80 * GiB,
        2039 * GB,
        gemm_efficiency=0.80,
        gemm_overhead_s=8e-6,
        attention_efficiency=0.64,
        attention_row_s=1.6e-9,
        fp32_peak_flops=19.5 * TFLOPS,
    ),
    "h100-sxm": Device(
        "H100 SXM 80GB",
        "gpu",
        989 * TFLOPS,
        80 * GiB,
        3350 * GB,
        gemm_efficiency=0.75,
        gemm_overhead_s=8e-6,
        attention_efficiency=0.57,
        attention_row_s=1.75e-9,
        fp32_peak_flops=67 * TFLOPS,
    ),
    "h200": Device(
        "H200 SXM 141GB",
        "gpu",
        989 * TFLOPS,
        141 * GB,
        4800 * GB,
        gemm_efficiency=0.75,
        gemm_overhead_s=8e-6,
        attention_efficiency=0.57,
        attention_row_s=1.75e-9,
        fp32_peak_flops=67 * TFLOPS,
    ),
}

# NVLink 3 (A100): 12 links x 25 GB/s = 300 GB/s per direction; NVLink 4 (H100/H200): 18 x 25 =
# 450 GB/s. NCCL's all-reduce bus bandwidth reaches ~80% of it (nccl-tests on DGX A100: ~230-240
# GB/s). Inter-node: one HDR InfiniBand port (200 Gb/s = 25 GB/s) per A100 in a DGX A100, one NDR
# port (400 Gb/s = 50 GB/s) per H100 in a DGX H100.
NVLINK3 = Link(300 * GB, 3e-6, 0.8)
NVLINK4 = Link(450 * GB, 3e-6, 0.8)
IB_HDR = Link(25 * GB, 6e-6, 0.8)
IB_NDR = Link(50 * GB, 6e-6, 0.8)

CLUSTERS: dict[str, tuple[str, Link, Link, int]] = {
    # name: (device preset, intra-node link, inter-node link, devices per node)
    "dgx-a100-40gb": ("a100-40gb", NVLINK3, IB_HDR, 8),
    "dgx-a100-80gb": ("a100-80gb", NVLINK3, IB_HDR, 8),
    "dgx-h100": ("h100-sxm", NVLINK4, IB_NDR, 8),
    "dgx-h200": ("h200", NVLINK4, IB_NDR, 8),
}
# Each device preset also names its usual 8-GPU node.
CLUSTERS.update(
    {
        "a100-40gb": CLUSTERS["dgx-a100-40gb"],
        "a100-80gb": CLUSTERS["dgx-a100-80gb"],
        "h100-sxm": CLUSTERS["dgx-h100"],
        "h100": CLUSTERS["dgx-h100"],
        "h200": CLUSTERS["dgx-h200"],
    }
)

CPU_LOCAL = "cpu-local"


_DEVICE_KEYS = {
    "name": ("name", str, 1),
    "kind": ("kind", str, 1),
    "peak_tflops": ("peak_flops", float, TFLOPS),
    "memory_gb": ("memory_bytes", float, GB),
    "memory_gib": ("memory_bytes", float, GiB),
    "hbm_gbps": ("mem_bandwidth", float, GB),
    "gemm_efficiency": ("gemm_efficiency", float, 1),
    "gemm_overhead_us": ("gemm_overhead_s", float, 1e-6),
    "attention_efficiency": ("attention_efficiency", float, 1),
    "mem_efficiency": ("mem_efficiency", float, 1),
    "reduction_efficiency": ("reduction_efficiency", float, 1),
    "attention_row_ns": ("attention_row_s", float, 1e-9),
    "op_overhead_us": ("op_overhead_s", float, 1e-6),
    "host_op_overhead_us": ("host_op_overhead_s", float, 1e-6),
    "reserve_gb": ("reserve_bytes", float, GB),
}
_LINK_KEYS = {"bandwidth_gbps": ("bandwidth", GB), "latency_us": ("latency_s", 1e-6), "efficiency": ("efficiency", 1)}


# Keys that must be strictly positive (a zero would divide by zero in the cost model), and
# efficiencies, which are fractions of a datasheet figure.
_POSITIVE = {"peak_tflops", "memory_gb", "memory_gib", "hbm_gbps", "bandwidth_gbps"}
_FRACTIONS = {"gemm_efficiency", "attention_efficiency", "mem_efficiency", "reduction_efficiency", "efficiency"}


def load_cluster_file(path: Path, nodes: int | None = None, devices_per_node: int | None = None) -> Cluster:
    """Read a cluster TOML file (format in the module docstring). Unknown keys are errors, and so
    are impossible values and a missing link: [intra] (with its bandwidth_gbps) whenever a node
    has more than one device, [inter] whenever there is more than one node, counted after the
    `nodes` / `devices_per_node` overrides. Nothing silently takes a preset's figure."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"cluster file {path} does not exist.") from None
    except IsADirectoryError:
        raise ConfigError(f"cluster file {path} is a directory; pass a TOML file.") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"cluster file {path} is not valid TOML: {e}.") from None
    src = str(path)
    allowed = {"name", "nodes", "devices_per_node", "device", "intra", "inter", "notes"}
    unknown = set(raw) - allowed
    if unknown:
        raise ConfigError(f"{src}: unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(allowed))}.")
    dev_raw = dict(raw.get("device", {}))
    preset = dev_raw.pop("preset", None)
    if preset is not None and preset not in DEVICES:
        raise ConfigError(f"{src}: unknown device preset '{preset}'; presets: {', '.join(DEVICES)}.")
    device = DEVICES[preset] if preset else None
    values = {}
    for key, value in dev_raw.items():
        if key not in _DEVICE_KEYS:
            raise ConfigError(f"{src}: unknown key 'device.{key}'; valid: preset, {', '.join(_DEVICE_KEYS)}.")
        attr, typ, scale = _DEVICE_KEYS[key]
        values[attr] = value if typ is str else _number(src, f"device.{key}", value) * scale
    if device is None:
        missing = [k for k in ("peak_tflops", "hbm_gbps") if k not in dev_raw]
        if missing or not ({"memory_gb", "memory_gib"} & set(dev_raw)):
            raise ConfigError(f"{src}: [device] needs 'preset' or at least peak_tflops, memory_gb and hbm_gbps.")
        device = Device(
            values.pop("name", "custom"),
            values.pop("kind", "gpu"),
            values.pop("peak_flops"),
            values.pop("memory_bytes"),
            values.pop("mem_bandwidth"),
        )
    device = replace(device, **values)
    per_node = devices_per_node or _count(src, "devices_per_node", raw.get("devices_per_node", 8))
    nodes = nodes or _count(src, "nodes", raw.get("nodes", 1))
    intra = _link(src, "intra", raw.get("intra"), NVLINK4, needed=per_node > 1)
    inter = _link(src, "inter", raw.get("inter"), IB_NDR, needed=nodes > 1)
    return Cluster(
        str(raw.get("name", Path(path).stem)), device, nodes, per_node, intra, inter, notes=str(raw.get("notes", ""))
    )


def _count(src: str, key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{src}: '{key}' expects a positive integer, got {value!r}.")
    return value


def _number(src: str, key: str, value) -> float:
    """A finite number: > 0 for capacities and bandwidths, in (0, 1] for efficiencies, >= 0 else."""
    name = key.rsplit(".", 1)[-1]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{src}: '{key}' expects a finite number, got {value!r}.")
    if name in _FRACTIONS and not 0 < value <= 1:
        raise ConfigError(f"{src}: '{key}' is a fraction of the datasheet figure and must be in (0, 1], got {value!r}.")
    if name in _POSITIVE and value <= 0:
        raise ConfigError(f"{src}: '{key}' must be greater than 0, got {value!r}.")
    if value < 0:
        raise ConfigError(f"{src}: '{key}' expects a non-negative number, got {value!r}.")
    return float(value)


def _link(src: str, section: str, raw: dict | None, default: Link, needed: bool) -> Link:
    """The [intra] / [inter] link; bandwidth_gbps is required, latency and efficiency default to
    the NVLink / InfiniBand figures in `default`."""
    what = "between the devices of a node" if section == "intra" else "between nodes"
    if raw is None:
        if needed:
            raise ConfigError(
                f"{src}: no [{section}] section, but the cluster needs a link {what}. Add [{section}] with "
                f"bandwidth_gbps = <GB/s per device and direction> (and latency_us); see docs/planner.md."
            )
        return default
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: '{section}' must be a table ([{section}]), got {type(raw).__name__}.")
    if "bandwidth_gbps" not in raw:
        raise ConfigError(
            f"{src}: [{section}] has no bandwidth_gbps, the link's speed {what} in GB/s per device and direction; "
            f"add it (no default is assumed)."
        )
    values = {}
    for key, value in raw.items():
        if key not in _LINK_KEYS:
            raise ConfigError(f"{src}: unknown key '{section}.{key}'; valid: {', '.join(_LINK_KEYS)}.")
        attr, scale = _LINK_KEYS[key]
        values[attr] = _number(src, f"{section}.{key}", value) * scale
    return replace(default, **values)

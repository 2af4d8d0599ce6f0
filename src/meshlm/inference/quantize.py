"""Int8 linear layers for decoding and evaluation: any family's nn.Linear modules swapped for a
copy whose weight is stored in int8, one float scale per output row (symmetric:
scale_r = max_k |W_rk| / 127, q_rk = round(W_rk / scale_r), each weight off by at most
scale_r / 2).

Decoding a small batch is bound by reading the weights (each weight element is used B times a
step); int8 reads a quarter of float32's bytes. Two kernels, both PyTorch's own:

- CPU, float32 (`DynamicInt8Linear`): fbgemm's int8 GEMM (`torch.ops.quantized.linear_dynamic`,
  the kernel behind torch.ao's dynamic quantisation), which also quantises each call's
  activations to int8 (one scale per call, from their range; no calibration) and accumulates
  in int32. Measured on the benchmark machine (1 thread, 512 -> 1536 and 512 -> 8192): 2-5x
  faster than the prepacked float32 linear at 1 and 16 rows. PyTorch's weight-only int8 kernel
  (`aten._weight_int8pack_mm`, what torchao's int8 weight-only layout calls on CPU) was 3-5x
  slower than float32 at one row and 50-90x slower at 16 on the same machine, so it is not
  used on CPU. The activation rounding is the price: quality is checked against the
  unquantised model (perplexity, greedy agreement: docs/benchmarks.md).
- Elsewhere (`Int8Linear`: another device, or bfloat16 / float16 activations): weight-only,
  `aten._weight_int8pack_mm` where it runs for that device and dtype, else the weight
  dequantised for each call (same numbers, slower).

Row-parallel shards (tensor parallelism) are quantised per shard (a shard's rows are whole
rows of its input slice, so its scales are its own) and keep their all-reduce before the
replicated bias, as linear_ops.PackedLinear does.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from meshlm.config import ConfigError
from meshlm.inference.linear_ops import swappable_linear
from meshlm.model.registry import meta_model
from meshlm.parallel.tensor_parallel import RowParallelLinear

QUANTIZE_MODES = ("none", "int8")


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): int8 (N, K) and float32 (N,) with weight ~= q * scale[:, None] (symmetric, per row)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Int8Linear(nn.Module):
    """y = x (q * scale)^T (+ all-reduce over the row-parallel group) (+ b); q int8, one scale a row."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        dtype = linear.weight.dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_int8_rows(linear.weight)
        self.register_buffer("qweight", q)  # (N, K) int8
        self.register_buffer("scale", scale.to(dtype))  # (N,) in the activations' dtype, as the kernel wants
        bias = linear.bias.detach() if linear.bias is not None else None
        self.group = linear.group if isinstance(linear, RowParallelLinear) else None
        # Row-parallel: the bias is replicated and added once, after the reduction.
        self.bias, self.bias_after = (None, bias) if self.group is not None else (bias, None)
        self.fused_kernel = _int8_kernel_works(q.device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, K)
        if self.fused_kernel:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scale)
        else:
            y = F.linear(x2, self.qweight.to(x.dtype) * self.scale[:, None])
        y = y.reshape(*shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        if self.group is not None:
            dist.all_reduce(y, group=self.group)  # g: sum the rank's partial products
        return y + self.bias_after if self.bias_after is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, per-row scale"


class DynamicInt8Linear(nn.Module):
    """CPU, float32: y = int8(x) (q * scale)^T through fbgemm (+ all-reduce over the row-parallel
    group) (+ b). The weight is prepacked once into fbgemm's layout with its per-row scales."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_int8_rows(linear.weight)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.group = linear.group if isinstance(linear, RowParallelLinear) else None
        # Row-parallel: the bias is replicated and added once, after the reduction.
        inner_bias, self.bias_after = (None, bias) if self.group is not None else (bias, None)
        zero_points = torch.zeros(q.shape[0], dtype=torch.long)
        previous = torch.backends.quantized.engine
        with warnings.catch_warnings():
            # PyTorch marks quantized-tensor creation deprecated; fbgemm's prepack still takes one.
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero_points, 0)
            try:
                torch.backends.quantized.engine = "fbgemm"  # the packed weight keeps its engine
                self.packed = torch.ops.quantized.linear_prepack(qweight, inner_bias)
            finally:
                torch.backends.quantized.engine = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # reduce_range=False: full 8-bit activations (the CPU has VNNI or fbgemm avoids overflow itself)
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).contiguous(), self.packed, False)
        y = y.reshape(*shape[:-1], self.out_features)
        if self.group is not None:
            dist.all_reduce(y, group=self.group)  # g: sum the rank's partial products
        return y + self.bias_after if self.bias_after is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight and activations (fbgemm)"


def fbgemm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """fbgemm's int8 GEMM: CPU, float32 activations, a torch built with fbgemm."""
    return device.type == "cpu" and dtype == torch.float32 and "fbgemm" in torch.backends.quantized.supported_engines


_KERNEL_CHECKED: dict[tuple[str, torch.dtype], bool] = {}


def _int8_kernel_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether aten._weight_int8pack_mm runs for this device and activation dtype (tried once,
    on a tiny product checked against the dequantised weight)."""
    key = (device.type, dtype)
    if key not in _KERNEL_CHECKED:
        try:
            x = torch.ones(2, 32, dtype=dtype, device=device)
            q = torch.ones(8, 32, dtype=torch.int8, device=device)
            s = torch.full((8,), 0.5, dtype=dtype, device=device)
            y = torch.ops.aten._weight_int8pack_mm(x, q, s)
            _KERNEL_CHECKED[key] = bool((y.float() == 16.0).all())
        except (RuntimeError, NotImplementedError, AttributeError):
            _KERNEL_CHECKED[key] = False
    return _KERNEL_CHECKED[key]


def check_quantize(mode: str | None) -> str:
    """The mode, checked: 'none' (or None) or 'int8'."""
    mode = mode or "none"
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"quantize '{mode}' is not supported; choose one of: {', '.join(QUANTIZE_MODES)}.")
    return mode


def check_quantizable(model_cfg, mode: str | None) -> None:
    """Refuse, before any model is loaded, a quantisation mode that is unknown or that the
    model's family cannot use (no linear layers); the model is built on the meta device."""
    if check_quantize(mode) != "none" and not any(swappable_linear(m) for m in meta_model(model_cfg).modules()):
        raise _no_linears(model_cfg.family, mode)


def _no_linears(family: str, mode: str) -> ConfigError:
    return ConfigError(
        f"--quantize {mode}: the model ({family}) has no linear layers to quantise; run it without --quantize "
        "(int8 quantisation applies to families whose weights are linear layers)."
    )


def quantize_linears(model: nn.Module, mode: str = "int8") -> int:
    """Swap every nn.Linear of `model` (and column- or row-parallel shards of one) for its
    weight-only quantised version, in place; returns how many were swapped. Refuses a model
    with no linear layer (nothing to quantise: a maxent or hmm model)."""
    if check_quantize(mode) == "none":
        return 0
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if swappable_linear(child):
                weight = child.weight
                kind = DynamicInt8Linear if fbgemm_available(weight.device, weight.dtype) else Int8Linear
                quantized = kind(child)
                # the module's hooks (e.g. a tensor-parallel region entrance) stay in front of it
                quantized._forward_pre_hooks, quantized._forward_hooks = child._forward_pre_hooks, child._forward_hooks
                setattr(module, name, quantized)
                swapped += 1
    if swapped == 0:
        raise _no_linears(getattr(getattr(model, "cfg", None), "family", type(model).__name__), mode)
    return swapped

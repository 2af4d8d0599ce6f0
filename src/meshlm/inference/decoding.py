"""The engine's side of a family's incremental decoding: which model it decodes with, and the
DecodeState (meshlm.model.spec) built from it through the family's spec. Nothing here knows a
family: the state's maths are the family's own modules (model/<family>/), and the speedups
applied here are generic: a copy of the model whose modules are called directly
(`direct_calls`), prepacked linears swapped into it (linear_ops), and decode steps replayed
from CUDA graphs for states with a fixed-shape step (cuda_graphs)."""

from __future__ import annotations

from torch import nn

from meshlm.inference.cuda_graphs import GraphedDecodeState
from meshlm.inference.linear_ops import packing_available, prepack_linears
from meshlm.model.registry import family_spec, meta_model
from meshlm.model.spec import DecodeState, shared_copy


def check_inference_model(model: nn.Module) -> None:
    """The engine runs whole models (not pipeline stages) of a family with a decode state, and
    tensor-parallel shards without sequence parallelism."""
    spec = family_spec(model.cfg)
    if spec.decode_state is None:
        raise ValueError(f"model family '{spec.name}' has no incremental decoding state (FamilySpec.decode_state)")
    info = getattr(model, "tensor_parallel", None)
    if info is not None and info.sequence_parallel:
        raise ValueError(
            "inference runs tensor parallelism without sequence parallelism; "
            "apply_tensor_parallel(model, group, sequence_parallel=False)"
        )
    # A pipeline stage is the model with some blocks and first- or last-stage modules dropped
    # (set to None); the whole model, built on the meta device, says which ones this config has.
    whole = meta_model(model.cfg)
    dropped = [
        name
        for name in (*spec.first_stage, *spec.last_stage)
        if getattr(whole, name, None) is not None and getattr(model, name, None) is None
    ]
    if dropped or len(getattr(model, spec.blocks)) != len(getattr(whole, spec.blocks)):
        raise ValueError("the inference engine needs a whole model (not a pipeline stage)")


_DIRECT: dict[type, type] = {}


def direct_calls(model: nn.Module) -> None:
    """Make the modules of a decoding copy cheap to call, in place: each module without hooks
    gets a subclass whose `__call__` is its `forward` (no hook machinery: ~3 us a call on the
    benchmark machine), and its parameters, buffers and submodules become plain attributes
    (no `nn.Module.__getattr__`: ~2 us each). A decode step of a small batch makes a few hundred
    such calls, which is what this saves; the maths are the modules' own. Modules with hooks
    (a tensor-parallel region entrance) keep nn.Module's call; global module hooks are not run."""
    for module in model.modules():
        cls = type(module)
        if cls.__call__ is not nn.Module.__call__:
            continue  # a class of its own making: leave alone
        if not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks):
            if cls not in _DIRECT:
                _DIRECT[cls] = type(cls.__name__, (cls,), {"__call__": cls.forward, "__module__": cls.__module__})
            module.__class__ = _DIRECT[cls]
        for entries in (module._parameters, module._buffers, module._modules):
            for name, value in entries.items():
                object.__setattr__(module, name, value)


class Decoder:
    """Builds DecodeStates for one model, on a copy of its module tree that shares the
    parameters (`direct_calls` applied). pack: copy weights into faster layouts (default: where
    oneDNN prepacking is available, i.e. CPU float32): the family's decode-only rewrites
    (`FamilySpec.decode_model`, e.g. fused projections), then every large linear layer
    prepacked. The copies do not follow later changes of the model's weights (or modules):
    build a new engine then.
    cuda_graphs: replay decode steps from CUDA graphs where the family's state has a fixed-shape
    step (default: on a GPU, without tensor parallelism)."""

    def __init__(self, model: nn.Module, pack: bool | None = None, cuda_graphs: bool | None = None):
        check_inference_model(model)
        self.spec = family_spec(model.cfg)
        param = next(model.parameters())
        self.device = param.device
        if pack is None:
            pack = packing_available(param.device, param.dtype)
        tp = getattr(model, "tensor_parallel", None)
        if cuda_graphs is None:
            cuda_graphs = param.device.type == "cuda" and (tp is None or tp.tp == 1)
        if cuda_graphs and param.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.pack, self.cuda_graphs = pack, cuda_graphs
        if pack and self.spec.decode_model is not None:
            self.model = self.spec.decode_model(model)
        else:
            self.model = shared_copy(model)
        if pack:
            prepack_linears(self.model)
        direct_calls(self.model)

    def new_state(self, max_batch: int, max_len: int) -> DecodeState:
        state = self.spec.decode_state(self.model, max_batch, max_len)
        if self.cuda_graphs and hasattr(state, "decode_static"):
            state = GraphedDecodeState(state, self.device)
        return state

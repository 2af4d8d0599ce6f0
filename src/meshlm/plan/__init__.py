"""The parallelism planner: which layout to use for a model on a cluster, how fast it will
run and how much memory it needs (`meshlm plan`, `parallel = "auto"`; docs/planner.md).

    hardware.py   devices, links, clusters; presets and cluster TOML files
    cpu_local.py  the measured `cpu-local` preset (micro-benchmark, cached per machine)
    models.py     model presets (GPT-3 sizes, Megatron's, BLOOM, OPT, Llama 3)
    layout.py     Layout, Workload, Software profiles; meshlm's validation of a layout
    shapes.py     which parameters and layers each rank holds (mirrors meshlm exactly)
    compute.py    per-kernel compute time of a micro-batch through a stage
    comm.py       alpha-beta collective costs on the link a group crosses
    memory.py     memory per device
    cost.py       one layout's step time and memory
    search.py     every layout, ranked
    api.py        plan(): search or evaluate one layout; PlanResult
    auto.py       choose_layout() for parallel = "auto"
    published.py  published large runs to compare with
"""

from meshlm.plan.api import PlanResult, plan
from meshlm.plan.clusters import make_cluster
from meshlm.plan.cost import Estimate, estimate
from meshlm.plan.hardware import Cluster, Device, Link
from meshlm.plan.layout import Layout, Software, Workload, parse_layout, software_for
from meshlm.plan.models import MODELS, model_preset

__all__ = [
    "plan",
    "PlanResult",
    "estimate",
    "Estimate",
    "Cluster",
    "Device",
    "Link",
    "make_cluster",
    "Layout",
    "Software",
    "Workload",
    "parse_layout",
    "software_for",
    "MODELS",
    "model_preset",
]

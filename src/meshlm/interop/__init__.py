"""Hugging Face interoperability: import HF checkpoints, export meshlm runs (no `transformers` needed).
Each model family declares its own adapter (FamilySpec.hf); this package reads and writes the
directories and dispatches to the adapter of the family that handles the architecture."""

from meshlm.interop.adapters import adapter_for_hf, adapter_of, model_config_from_hf, supported_architectures
from meshlm.interop.convert import export_hf, import_hf, load_hf_model, read_hf_model, write_hf_dir

__all__ = [
    "adapter_for_hf",
    "adapter_of",
    "export_hf",
    "import_hf",
    "load_hf_model",
    "model_config_from_hf",
    "read_hf_model",
    "supported_architectures",
    "write_hf_dir",
]

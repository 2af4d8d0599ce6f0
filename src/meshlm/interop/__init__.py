"""Hugging Face interoperability: import HF checkpoints, export meshlm runs (no `transformers` needed)."""

from meshlm.interop.convert import export_hf, import_hf, load_hf_model, write_hf_dir
from meshlm.interop.hf_config import SUPPORTED_ARCHITECTURES, hf_config_from_model, model_config_from_hf

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "export_hf",
    "hf_config_from_model",
    "import_hf",
    "load_hf_model",
    "model_config_from_hf",
    "write_hf_dir",
]

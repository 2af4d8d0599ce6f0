"""Data pipeline: corpus sources -> byte-level BPE -> token files -> deterministic batches."""

from meshlm.data.loader import (
    TokenDataset,
    eval_batch,
    eval_batches,
    get_batch,
    sample_ids_for,
    train_batch,
)
from meshlm.data.prepare import data_dir_for, default_data_dir, prepare_data
from meshlm.data.sources import describe_source, iter_documents
from meshlm.data.tokenizer import (
    EOT_ID,
    EOT_TOKEN,
    decode,
    encode,
    load_or_train_tokenizer,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "EOT_ID",
    "EOT_TOKEN",
    "TokenDataset",
    "data_dir_for",
    "decode",
    "default_data_dir",
    "describe_source",
    "encode",
    "eval_batch",
    "eval_batches",
    "get_batch",
    "iter_documents",
    "load_or_train_tokenizer",
    "load_tokenizer",
    "prepare_data",
    "sample_ids_for",
    "train_batch",
    "train_tokenizer",
]

"""Tiny models of every registered model family, for the parity matrix and the other
family-parametrised tests. A new family adds its case(s) here: overrides that select the
family (`model.family=...`) and a small size; BASE in each test supplies the data and training
keys and the common model keys (vocab_size, max_seq_len)."""

from __future__ import annotations

FAMILY_CASES: dict[str, list[str]] = {
    # llama with grouped-query attention (8 heads, 4 kv heads: splits up to tp4), untied output
    "llama": [
        'model.family="transformer"',
        'model.arch="llama"',
        "model.d_model=64",
        "model.n_layers=4",
        "model.n_heads=8",
        "model.n_kv_heads=4",
        "model.tie_embeddings=false",
    ],
    # gpt2: learned positions, biases, tied embeddings
    "gpt2": [
        'model.family="transformer"',
        'model.arch="gpt2"',
        "model.d_model=64",
        "model.n_layers=4",
        "model.n_heads=4",
        "model.n_kv_heads=0",
    ],
    # lstm: tied output behind a d_hidden -> d_embed projection; the vocabulary splits under tp,
    # the layers stay whole (no sequence parallelism: refused)
    "lstm": [
        'model.family="lstm"',
        "model.d_embed=32",
        "model.d_hidden=48",
        "model.n_layers=4",
        "model.tie_embeddings=true",
    ],
}

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
    # log-linear trigram: hashed tables split by vocabulary columns under tp (301 pads to 302)
    "maxent": [
        'model.family="maxent"',
        "model.order=3",
        "model.hash_rows=64",
        "model.init_std=0.1",
    ],
    # hidden Markov LM trained by gradient (marginal likelihood), vocabulary-parallel emissions
    "hmm": [
        'model.family="hmm"',
        "model.n_states=16",
    ],
    # gated CNN with bottleneck blocks (a replicated down-projection before each convolution:
    # sequence-parallel gradient sums) and a tied output layer (split over pipeline stages)
    "gcnn": [
        'model.family="gcnn"',
        "model.d_model=64",
        "model.n_layers=4",
        "model.kernel_size=4",
        "model.bottleneck=32",
        "model.channels=48",
        "model.tie_embeddings=true",
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

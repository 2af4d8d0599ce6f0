"""The on-disk formats every layer above training shares: the run directory (config, metrics,
tokenizer, final weights) and the single-file weights format. Training writes them; inference,
interop and export read them; none of those import each other for it."""

"""The transformer family: decoder-only llama and gpt2 variants (model.py), their [model] keys
(config.py), parameter and FLOP counts (stats.py) and the family spec (spec.py)."""

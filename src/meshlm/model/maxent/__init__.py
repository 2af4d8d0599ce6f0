"""The maxent family: a log-linear (maximum-entropy) n-gram language model with hashed feature
weights (model.py), its [model] keys (config.py), its decoding state (decode.py) and its spec."""

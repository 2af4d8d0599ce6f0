"""The gated convolutional language model family (Dauphin et al. 2017, "Language Modeling with
Gated Convolutional Networks"): the single-device model (model.py), its [model] keys
(config.py), parameter and FLOP counts (stats.py), the rolling-buffer decode state (decode.py)
and the family spec (spec.py)."""

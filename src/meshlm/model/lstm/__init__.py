"""The LSTM language-model family (PyTorch's word_language_model example, AWD-LSTM without its
regularisation tricks): its [model] keys (config.py), the single-device model (model.py),
parameter and FLOP counts (stats.py), incremental decoding with (h, c) per slot (decode.py)
and the family spec (spec.py)."""

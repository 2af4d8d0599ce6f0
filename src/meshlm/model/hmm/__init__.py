"""The hmm family: a hidden Markov language model (model.py: forward algorithm, Viterbi), its
Baum-Welch statistics (em.py), its decoding state (decode.py), [model] keys and spec."""

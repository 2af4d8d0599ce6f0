"""The HMM's decoding state: per slot, the filtered state distribution pushed one step through
the transitions, pred = p(z_{t+1} | x_<=t) (S numbers). A new token is one filter step, and the
next-token probabilities are exact: log(pred @ E). An empty slot starts from pi."""

from __future__ import annotations

import torch

from meshlm.model.hmm.model import HMMLM, filter_step, scaled_emissions


class FilterDecodeState:
    """DecodeState (meshlm.model.spec) of an HMMLM, or of its tensor-parallel shard."""

    def __init__(self, model: HMMLM, max_batch: int, max_len: int):
        self.model, self.max_batch, self.max_len = model, max_batch, max_len
        self.chain = model.chain["0"]
        with torch.no_grad():
            self.pi = self.chain.start(1)[0].detach()  # (S,)
        self.pred = self.pi.repeat(max_batch, 1)  # (max_batch, S)
        self.lengths = [0] * max_batch

    def _step(self, pred: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        e, _ = scaled_emissions(self.model.emission(tokens))  # (n, S)
        filtered, _ = filter_step(pred, e)
        return filtered @ self.chain.transition_probs()

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        for prompt, slot in zip(prompts, slots):
            ids = torch.tensor([prompt], dtype=torch.long, device=self.pred.device)  # (1, T)
            _, pred, _ = self.chain(self.model.emission(ids), prior=self.pred[slot : slot + 1])
            self.pred[slot] = pred[0, -1]
            self.lengths[slot] += len(prompt)
        return self.model.emission.predictive_logits(self.pred[slots])  # (n, V_local)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[0]
        self.pred[:n] = self._step(self.pred[:n], tokens.to(self.pred.device))
        for i in range(n):
            self.lengths[i] += 1
        return self.model.emission.predictive_logits(self.pred[:n])

    def release(self, slot: int) -> None:
        self.pred[slot] = self.pi
        self.lengths[slot] = 0

    def move_slot(self, src: int, dst: int) -> None:
        if src == dst:
            return
        self.pred[dst] = self.pred[src]
        self.lengths[dst] = self.lengths[src]
        self.release(src)

    def nbytes(self) -> int:
        return self.pred.numel() * self.pred.element_size()

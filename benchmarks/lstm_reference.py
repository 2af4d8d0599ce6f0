"""The LSTM family against a PyTorch word_language_model-style reference, single process, CPU.

Training: meshlm's LSTM (one single-layer nn.LSTM per block, batch-first (B, T) batches as the
data loader gives them) against the example's model (one multi-layer nn.LSTM, time-major (T, B)
batches prepared once outside the timed loop, as the example's `batchify` does). Same shapes,
same weights (copied; logits checked equal), same batches, same optimizer (AdamW, foreach) and
clipping. An ablation runs the reference on batch-first (B, T) batches, to separate the batch
layout from the per-layer split. The three alternate in one process, the order rotating every
round; the figure is the median of the per-round ratios of step times (reference / meshlm, so
>= 0.95 is the target: the family adds no overhead to nn.LSTM), with their range.

Decoding: 256 new tokens (greedy) after a 16-token prompt with the family's decode state
((h, c) per slot, `FamilySpec.decode_state`) against full recomputation (the whole sequence
through the model for every new token), alternating rounds; both must produce the same tokens.

    python benchmarks/lstm_reference.py [--rounds 7 --steps 3 --threads 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

from meshlm.config import load_config
from meshlm.model.loss import lm_loss
from meshlm.model.registry import build_model, family_spec

# name -> [model] overrides (vocabulary 2048 as lstm-tiny; E == H: the example ties only then)
SHAPES = {
    "lstm-small (E=H=256, 2 layers)": ["model.d_embed=256", "model.d_hidden=256", "model.n_layers=2"],
    "lstm-medium (E=H=512, 3 layers)": ["model.d_embed=512", "model.d_hidden=512", "model.n_layers=3"],
}


class WordLanguageModel(nn.Module):
    """pytorch/examples word_language_model's RNNModel (LSTM, tied, dropout 0): encoder,
    one multi-layer nn.LSTM over (T, B, E), decoder. batch_first=True: the same over (B, T)
    batches (an ablation: the batch layout alone, without the per-layer split)."""

    def __init__(self, vocab: int, d: int, n_layers: int, batch_first: bool = False):
        super().__init__()
        self.encoder = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, d, n_layers, batch_first=batch_first)
        self.decoder = nn.Linear(d, vocab)
        self.decoder.weight = self.encoder.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (T, B) -> logits (T, B, V)
        output, _ = self.rnn(self.encoder(x))
        return self.decoder(output)


@torch.no_grad()
def reference_from(ours, batch_first: bool = False) -> WordLanguageModel:
    cfg = ours.cfg
    ref = WordLanguageModel(cfg.vocab_size, cfg.d_embed, cfg.n_layers, batch_first)
    ref.encoder.weight.copy_(ours.embedding.weight)
    ref.decoder.bias.copy_(ours.output.bias)
    for i, block in enumerate(ours.layers.values()):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(ref.rnn, f"{name}_l{i}").copy_(getattr(block.lstm, f"{name}_l0"))
    return ref


def make_step(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)

    def step(x, y):
        lm_loss(model(x), y).backward()  # flattens (B, T, V) or (T, B, V) alike
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(fn, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - started) / steps


def training(args) -> None:
    print(f"\n## training, batch {args.batch} x {args.seq_len}, {args.rounds} rounds of {args.steps} steps\n")
    print(
        "| model | params | meshlm tokens/s | reference tokens/s | reference, batch-first tokens/s "
        "| meshlm / reference | batch-first reference / reference |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, overrides in SHAPES.items():
        cfg = load_config("lstm-tiny", overrides).model
        ours = build_model(cfg, seed=0)
        ref, ref_bf = reference_from(ours), reference_from(ours, batch_first=True)
        x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len))  # (B, T), the loader's layout
        y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len))
        x_tm, y_tm = x.t().contiguous(), y.t().contiguous()  # (T, B), the example's layout, made once
        with torch.no_grad():
            for logits in (ref(x_tm).transpose(0, 1), ref_bf(x)):
                diff = (ours(x) - logits).abs().max().item()
                assert diff < 1e-5, f"{name}: logits differ by {diff}"
        step_ours, step_ref, step_bf = make_step(ours), make_step(ref), make_step(ref_bf)
        steps = {"ours": lambda: step_ours(x, y), "ref": lambda: step_ref(x_tm, y_tm), "bf": lambda: step_bf(x, y)}
        for step in steps.values():
            timed(step, 1)  # warm-up
        times: dict[str, list[float]] = {k: [] for k in steps}
        for r in range(args.rounds):
            order = list(steps)[r % 3 :] + list(steps)[: r % 3]  # rotate: none always runs first
            for key in order:
                times[key].append(timed(steps[key], args.steps))
        tokens = args.batch * args.seq_len
        med = {k: statistics.median(v) for k, v in times.items()}
        # per-round ratios (the contenders ran back to back), their median and range: on a shared
        # machine the load drifts between rounds, not within one
        ratios = {k: sorted(r / o for r, o in zip(times["ref"], times[k])) for k in ("ours", "bf")}

        def ratio(k: str) -> str:
            return f"{statistics.median(ratios[k]):.3f} ({ratios[k][0]:.2f}-{ratios[k][-1]:.2f})"

        n_params = sum(p.numel() for p in ours.parameters())
        print(
            f"| {name} | {n_params / 1e6:.1f}M | {tokens / med['ours']:,.0f} | {tokens / med['ref']:,.0f} "
            f"| {tokens / med['bf']:,.0f} | {ratio('ours')} | {ratio('bf')} |",
            flush=True,
        )


@torch.no_grad()
def generate_with_state(model, prompt: list[int], n: int) -> list[int]:
    state = family_spec(model.cfg).decode_state(model, 1, len(prompt) + n)
    logits = state.prefill([prompt], [0])
    out = []
    for _ in range(n):
        token = logits.argmax(-1)  # (1,)
        out.append(int(token))
        logits = state.decode(token)
    return out


@torch.no_grad()
def generate_recomputing(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(n):
        token = model(ids)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        ids = torch.cat([ids, token], dim=1)
    return ids[0, len(prompt) :].tolist()


def decoding(args) -> None:
    n = args.new_tokens
    print(f"\n## decoding, batch 1, 16-token prompt, {n} new tokens (greedy), {args.decode_rounds} rounds\n")
    print("| model | decode state tokens/s | full recomputation tokens/s | speed-up |")
    print("|---|---|---|---|")
    for name, overrides in SHAPES.items():
        cfg = load_config("lstm-tiny", overrides + [f"model.max_seq_len={16 + n}"]).model
        model = build_model(cfg, seed=0).eval()
        prompt = torch.randint(0, cfg.vocab_size, (16,), generator=torch.Generator().manual_seed(0)).tolist()
        runs = {"state": generate_with_state, "full": generate_recomputing}
        assert runs["state"](model, prompt, n) == runs["full"](model, prompt, n), "decoding must not change the tokens"
        times: dict[str, list[float]] = {k: [] for k in runs}
        for r in range(args.decode_rounds):
            for key in list(runs)[:: 1 if r % 2 == 0 else -1]:
                times[key].append(timed(lambda f=runs[key]: f(model, prompt, n), 1))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {name} | {n / med['state']:,.0f} | {n / med['full']:,.0f} | {med['full'] / med['state']:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--decode-rounds", type=int, default=3)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-decoding", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# lstm vs word_language_model reference, {platform.processor() or platform.machine()}, "
        f"{args.threads} thread(s), torch {torch.__version__}, float32, oneDNN RNN kernels "
        f"{'on' if torch.backends.mkldnn.is_available() else 'off'}"
    )
    if not args.skip_training:
        training(args)
    if not args.skip_decoding:
        decoding(args)


if __name__ == "__main__":
    main()

"""CLI subcommands of the inference side: `meshlm generate`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meshlm.config import ConfigError


def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained model")
    p.add_argument("--run", required=True, help="run directory written by `meshlm train`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    from meshlm.inference.simple_generate import generate_tokens, load_run

    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise ConfigError("need --max-new-tokens >= 0, --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1.")
    loaded = load_run(Path(args.run))
    tok = loaded.tokenizer
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    produced: list[int] = []
    printed = ""
    for token in generate_tokens(loaded.model, tok.encode(args.prompt).ids, args.max_new_tokens,
                                 args.temperature, args.top_k, args.top_p, args.seed):
        produced.append(token)
        # Decode the whole continuation each time: a byte-level token may end mid-character.
        text = tok.decode(produced)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    sys.stdout.write(tok.decode(produced)[len(printed):] + "\n")
    return 0

"""`meshlm convert`: Hugging Face model directories in and out."""

from __future__ import annotations

import argparse
from pathlib import Path

from meshlm.config import ConfigError


def add_commands(sub) -> None:
    p = sub.add_parser("convert", help="import a Hugging Face model directory, or export a run as one")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="HF_DIR", help="local Hugging Face directory to import")
    direction.add_argument("--to-hf", action="store_true", help="export --run as a Hugging Face directory")
    p.add_argument("--run", help="with --to-hf: the meshlm run directory to export")
    p.add_argument("--step", type=int, default=None, help="with --to-hf: a checkpoint step instead of the final model")
    p.add_argument(
        "--out", required=True, help="the run directory (import) or Hugging Face directory (export) to write"
    )
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from meshlm.interop.convert import export_hf, import_hf

    if args.from_hf:
        out = import_hf(Path(args.from_hf), Path(args.out), overwrite=args.overwrite)
        print(f"imported {args.from_hf} -> {out} (generate with: meshlm generate --run {out} --prompt ...)")
        return 0
    if not args.run:
        raise ConfigError("meshlm convert --to-hf needs --run RUN_DIR, the meshlm run to export.")
    out = export_hf(Path(args.run), Path(args.out), step=args.step, overwrite=args.overwrite)
    print(f"exported {args.run} -> {out} (loads with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0

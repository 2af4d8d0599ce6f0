"""`meshlm plan`: the layout search from the command line (the library does the work)."""

from __future__ import annotations

import argparse
import json
import sys

from meshlm.config import ConfigError
from meshlm.plan.measure import DEFAULT_STEPS, format_measured, summary


def add_commands(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="pick the parallel layout for a model on a cluster; predict its speed and memory",
        description="Search every data/tensor/pipeline layout of a model on a cluster and rank them by predicted "
        "step time (docs/planner.md). Without --config or --model the default config is planned.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--config",
        "-c",
        default=None,
        help="meshlm config (TOML file or built-in name): its model, batch and sequence length",
    )
    src.add_argument("--model", default=None, help="model preset, e.g. gpt3-175b, llama3-70b (see docs/planner.md)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config key, e.g. --set model.n_layers=48 (repeatable)",
    )
    p.add_argument(
        "--cluster",
        default="cpu-local",
        help="cluster preset (dgx-a100-40gb, dgx-a100-80gb, dgx-h100, dgx-h200, a100-80gb, h100, ..., cpu-local) "
        "or a cluster TOML file (default: cpu-local, this machine, measured)",
    )
    p.add_argument("--nodes", type=int, default=None, help="number of nodes (default: the preset's, 1)")
    p.add_argument(
        "--devices-per-node",
        type=int,
        default=None,
        help="devices per node (cpu-local: local processes; default: the core count)",
    )
    p.add_argument(
        "--global-batch", type=int, default=None, help="sequences per optimizer step (default: the config's)"
    )
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the config's data.seq_len)")
    p.add_argument(
        "--layout",
        default=None,
        help="evaluate one layout instead of searching, e.g. dp=8,tp=8,pp=4,zero=1,micro_batch=1,recompute=full "
        "(also schedule=..., virtual_stages=..., sp=true, dp_replicate=...)",
    )
    p.add_argument("--top", type=int, default=10, help="candidates to show (default 10)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    p.add_argument(
        "--software",
        default="meshlm",
        help="how training software behaves: meshlm (default), megatron (2021-22 Megatron-LM / DeepSpeed: "
        "no FlashAttention), megatron-flash (Megatron-Core style)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=("bfloat16", "float32"),
        help="meshlm's training dtype (default: bfloat16 on accelerator clusters, the config's train.dtype on cpu-local)",
    )
    p.add_argument(
        "--all-layouts",
        action="store_true",
        help="also rank layouts meshlm cannot run (with --software other than meshlm this is implied)",
    )
    p.add_argument("--remeasure", action="store_true", help="cpu-local: run the micro-benchmark again")
    p.add_argument(
        "--measure-top",
        type=int,
        default=0,
        metavar="K",
        help="train the K best-predicted layouts for a few real steps on this machine (each through "
        "`meshlm train --nproc N`) and print the measured ranking beside the predicted one",
    )
    p.add_argument(
        "--measure-steps",
        type=int,
        default=DEFAULT_STEPS,
        metavar="S",
        help=f"steps per measured layout; the step time is the median of steps 2..S (default {DEFAULT_STEPS})",
    )
    p.add_argument(
        "--png",
        default=None,
        metavar="FILE",
        help="also draw every candidate: predicted step time against memory per device, the ones that do not "
        "fit greyed, the Pareto front marked",
    )
    serve = p.add_argument_group("serving (--serve)")
    serve.add_argument(
        "--serve",
        action="store_true",
        help="plan serving instead of training: tensor-parallel degree and replicas, weights and decode state "
        "per sequence, the largest batch that fits, decode tokens/s and time to first token",
    )
    serve.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (default min(512, max_seq_len/2))")
    serve.add_argument("--gen-len", type=int, default=None, help="generated tokens per request (default up to 128)")
    serve.add_argument("--max-ttft-ms", type=float, default=None, help="target: time to the first token")
    serve.add_argument("--min-tokens-per-s", type=float, default=None, help="target: generated tokens/s, all replicas")
    serve.add_argument("--max-tpot-ms", type=float, default=None, help="target: time per output token (decode step)")
    serve.add_argument(
        "--max-batch", type=int, default=256, help="most sequences one replica decodes together (default 256)"
    )
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from meshlm.plan.api import plan_from_args

    if args.top <= 0:
        raise ConfigError(f"--top must be positive, got {args.top}.")
    if args.measure_top < 0 or (args.measure_top and args.measure_steps < 2):
        raise ConfigError(
            f"--measure-top takes a number of layouts (>= 0, got {args.measure_top}) and --measure-steps at least 2 "
            f"steps (the first only warms up; got {args.measure_steps})."
        )
    if args.serve:
        from meshlm.plan.api import serve_from_args

        if args.layout or args.measure_top or args.png:
            raise ConfigError("--serve plans serving; --layout, --measure-top and --png are for training plans.")
        text, obj = serve_from_args(args)
        if args.json:
            json.dump(obj, sys.stdout, indent=1)
            sys.stdout.write("\n")
        else:
            print(text)
        return 0
    result = plan_from_args(args)
    note = lambda message: print(message, file=sys.stderr)  # noqa: E731
    if args.png:
        front = result.chart(args.png)
        note(f"meshlm plan: wrote {args.png} ({len(result.estimates)} layouts, {len(front)} on the Pareto front)")
    measured = result.measure(args.measure_top, args.measure_steps, log=note) if args.measure_top else None
    if args.json:
        obj = result.to_json(args.top)
        if measured is not None:
            s = summary(measured)
            obj["measured"] = [m.to_dict() for m in measured]
            obj["measured_summary"] = {
                "steps": args.measure_steps,
                "spearman": s["spearman"],
                "regret": s["regret"],
                "best": s["best"].estimate.layout.describe() if s["best"] else None,
            }
        json.dump(obj, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(result.text(args.top))
        if measured is not None:
            print(format_measured(measured, args.measure_steps))
    return 0

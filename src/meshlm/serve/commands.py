"""`meshlm serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

    meshlm serve --run runs/tiny-cpu --port 8000
    meshlm serve --init-from-hf ./Llama-3.2-1B --tp 2 --replicas 2 --api-key sk-local

Everything that can be wrong (the model files, the layout, the port, the limits) is
reported before any engine worker starts; the workers are started and loaded before the
port opens, so the first request never waits for a model to load.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from pathlib import Path

from meshlm.config import ConfigError
from meshlm.inference.commands import add_precision_args


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        default=None,
        help="run directory written by `meshlm train` (or `meshlm export`); --run-dir is the same, for torchrun",
    )
    src.add_argument(
        "--init-from-hf",
        metavar="HF_DIR",
        default=None,
        help="a local Hugging Face model directory, converted on the fly (its chat template is used)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("MESHLM_API_KEY"),
        help="require 'Authorization: Bearer KEY' on every route but /health (default: env MESHLM_API_KEY)",
    )
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per engine replica")
    p.add_argument("--replicas", type=int, default=1, help="data-parallel engine replicas behind the one front")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together per replica (cache slots)")
    p.add_argument("--max-queued", type=int, default=128, help="sequences allowed to wait for a slot; beyond that: 429")
    p.add_argument("--max-model-len", type=int, default=None, help="longest prompt + output (default: the model's)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the directory's)")
    add_precision_args(p)
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads per engine rank (default: the cores / engine ranks)"
    )
    p.add_argument(
        "--drain-timeout", type=float, default=30.0, help="on SIGTERM, seconds to let in-flight requests finish"
    )
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)


def _check_port(host: str, port: int) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}). Pick another --port or --host.") from None


def _check_limits(args: argparse.Namespace, model_len: int) -> int:
    problems = []
    for name in ("tp", "replicas", "max_batch"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.max_queued < 0:
        problems.append(f"--max-queued must be at least 0 (got {args.max_queued})")
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads must be at least 1 (got {args.threads})")
    length = args.max_model_len or model_len
    if not 2 <= length <= model_len:
        problems.append(f"--max-model-len must be between 2 and the model's context, {model_len} (got {length})")
    if problems:
        raise ConfigError("; ".join(problems) + ".")
    return length


def cmd_serve(args: argparse.Namespace) -> int:
    from meshlm.artifacts.run_dir import load_run_config
    from meshlm.data.tokenizer import end_of_text_id, load_tokenizer
    from meshlm.inference.commands import _converted_hf_run
    from meshlm.inference.loading import check_layout, find_model_files
    from meshlm.inference.quantize import check_quantizable
    from meshlm.serve.chat_template import ChatTemplate, hf_chat_template
    from meshlm.serve.engine_bridge import BridgeSettings, EngineBridge
    from meshlm.tasks.config import is_task_run

    hf_template = None
    if args.init_from_hf:
        hf_dir = Path(args.init_from_hf)
        if not (hf_dir / "config.json").is_file():
            raise ConfigError(f"{hf_dir} is not a Hugging Face model directory (no config.json).")
        hf_template = hf_chat_template(hf_dir)
        run = _converted_hf_run(hf_dir)
        name = args.served_model_name or hf_dir.resolve().name
    else:
        run = Path(args.run)
        name = args.served_model_name or run.resolve().name
        if is_task_run(run):
            return _serve_task(args, run, name)
    files = find_model_files(run=run)
    model_cfg = load_run_config(files.config.parent).model
    max_model_len = _check_limits(args, model_cfg.max_seq_len)
    check_layout(args.tp, args.tp, model_cfg)
    check_quantizable(model_cfg, args.quantize)
    _check_port(args.host, args.port)
    tokenizer = load_tokenizer(files.tokenizer)
    template, chat_tokenizer = hf_template or ChatTemplate(), tokenizer
    if hf_template is not None:  # it writes special tokens: map them to their ids
        chat_tokenizer = load_tokenizer(files.tokenizer)
        chat_tokenizer.encode_special_tokens = False  # (meshlm's default: any text is encoded as text)
    ranks = args.tp * args.replicas
    settings = BridgeSettings(
        run_dir=str(run),
        dtype=args.dtype,
        quantize=args.quantize,
        max_batch=args.max_batch,
        max_model_len=max_model_len,
        tp=args.tp,
        replicas=args.replicas,
        max_queued=args.max_queued,
        threads=args.threads or max(1, (os.cpu_count() or 1) // ranks),
    )
    bridge = EngineBridge(settings)
    bridge.start()  # the workers load the model while this process gets the front ready
    try:
        from meshlm.serve.app import build_app
        from meshlm.serve.routes import ServeState
        from meshlm.serve.server import serve_app

        state = ServeState(
            bridge=bridge,
            tokenizer=tokenizer,
            chat_template=template,
            chat_tokenizer=chat_tokenizer,
            model_name=name,
            max_model_len=max_model_len,
            vocab_size=model_cfg.vocab_size,
            eos_token_id=end_of_text_id(tokenizer),
            created=int(time.time()),
        )
        app = build_app(state, args.api_key)
        bridge.wait_ready()
        print(
            f"meshlm serve: '{name}' on http://{args.host}:{args.port}/v1 ({args.replicas} replica(s) x tp {args.tp}, "
            f"{args.max_batch} slots each, context {max_model_len}, chat template: {template.origin})",
            flush=True,
        )
        serve_app(app, args.host, args.port, args.drain_timeout, args.log_level)
    finally:
        bridge.shutdown()
    return 0


def _serve_task(args: argparse.Namespace, run: Path, name: str) -> int:
    """A task model (classify, ner, srl) on /v1/classify or /v1/tag: loaded in this process and
    run on one worker thread (serve.task_bridge); the engine flags do not apply."""
    import torch

    from meshlm.distributed.env import read_launch_env
    from meshlm.inference.quantize import quantize_linears
    from meshlm.serve.app import build_app
    from meshlm.serve.server import serve_app
    from meshlm.serve.task_bridge import TaskBridge, TaskBridgeSettings
    from meshlm.serve.task_routes import ROUTE, TaskServeState
    from meshlm.tasks.predict import load_task_model

    problems = [
        f"--{flag.replace('_', '-')} {getattr(args, flag)}" for flag in ("tp", "replicas") if getattr(args, flag) != 1
    ]
    problems += [f"--{flag.replace('_', '-')}" for flag in ("max_model_len",) if getattr(args, flag) is not None]
    problems += ["--dtype " + args.dtype] if args.dtype != "float32" else []
    if problems:
        raise ConfigError(
            f"{run} is a task model run, served by one in-process worker in float32 (as `meshlm predict` runs it); "
            f"drop {', '.join(problems)}."
        )
    for flag in ("max_batch", "max_queued"):
        low = 1 if flag == "max_batch" else 0
        if getattr(args, flag) < low:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least {low} (got {getattr(args, flag)}).")
    _check_port(args.host, args.port)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be at least 1 (got {args.threads}).")
        torch.set_num_threads(args.threads)
    loaded = load_task_model(run, read_launch_env().device)
    quantize_linears(loaded.model, args.quantize)  # as `meshlm predict --quantize`
    bridge = TaskBridge(loaded, TaskBridgeSettings(args.max_batch, args.max_queued))
    state = TaskServeState(bridge, loaded.task, name, loaded.cfg.data.seq_len, int(time.time()))
    app = build_app(state, args.api_key)
    route = ROUTE[loaded.task]
    print(f"meshlm serve: {loaded.task} model '{name}' on http://{args.host}:{args.port}{route}", flush=True)
    serve_app(app, args.host, args.port, args.drain_timeout, args.log_level)
    return 0

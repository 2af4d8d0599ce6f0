"""The `meshlm` command: parse arguments, call the library, turn user errors into one clear message."""

from __future__ import annotations

import argparse
import errno
import signal
import sys
import threading
import time
from pathlib import Path

from meshlm.config import ConfigError, load_config
from meshlm.distributed.doctor import add_commands as add_doctor_commands
from meshlm.inference.commands import add_commands as add_inference_commands
from meshlm.interop.commands import add_commands as add_interop_commands
from meshlm.plan.commands import add_commands as add_plan_commands
from meshlm.serve.commands import add_commands as add_serve_commands
from meshlm.tasks.commands import add_commands as add_task_commands
from meshlm.utils.errors import (
    EXIT_FAILURE,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USER_ERROR,
    REPORTED_BY_RANK0,
    RunError,
    Terminated,
)

# Subcommands that live next to their library code, each adding its parsers (the task side
# after inference: it hands task runs' `eval` and `predict` to its own handlers).
COMMAND_MODULES = (
    add_inference_commands,
    add_interop_commands,
    add_plan_commands,
    add_doctor_commands,
    add_serve_commands,
    add_task_commands,
)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="TOML file or built-in config name (default: tiny-cpu)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config key; repeatable, e.g. --set train.steps=100",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshlm", description="Train and serve GPT-style language models, on one CPU or many GPUs."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (prepares the data and tokenizer on first use)")
    _add_config_args(p)
    p.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--overwrite", action="store_true", help="replace a different run already in --out")
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="start N local worker processes (through torch.distributed.run, like torchrun)",
    )
    p.add_argument("--max-restarts", type=int, default=0, help="with --nproc: restart failed workers up to R times")
    p.add_argument(
        "--resume",
        default=None,
        metavar="DIR|auto",
        help="continue from a checkpoint directory, a run directory's newest complete checkpoint, or "
        "'auto': the newest complete one in --out (a fresh start when there is none)",
    )
    p.add_argument(
        "--init-from-hf",
        metavar="HF_DIR",
        default=None,
        help="start from a local Hugging Face model (same as --set train.init_from_hf=HF_DIR)",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("data", help="data preparation")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("prepare", help="corpus -> tokenizer.json + memory-mapped token files + index.json")
    _add_config_args(p)
    p.add_argument(
        "--source",
        default=None,
        help="python-stdlib | python-stdlib-prose | DIR | 'GLOB' | FILE.jsonl | FILE.parquet (default: data.source)",
    )
    p.add_argument("--out", default=None, help="output directory (default: data.dir or a cache folder)")
    p.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("config", help="configuration")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    p = config_sub.add_parser("show", help="print the resolved config as TOML")
    _add_config_args(p)
    p.set_defaults(func=cmd_config_show)

    p = sub.add_parser(
        "export", help="consolidate a sharded training checkpoint into model.safetensors + config + tokenizer"
    )
    p.add_argument("--run", required=True, help="run directory written by `meshlm train`")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    p.add_argument("--out", required=True, help="output directory (then: meshlm generate --run OUT)")
    p.set_defaults(func=cmd_export)

    for add_commands in COMMAND_MODULES:
        add_commands(sub)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from meshlm.distributed.dims import parallel_dims_from_config
    from meshlm.distributed.env import read_launch_env
    from meshlm.distributed.launch import check_nproc
    from meshlm.distributed.peer_errors import explain_peer_failures
    from meshlm.distributed.process_group import init_distributed, shutdown_distributed
    from meshlm.interop.init_from_hf import load_training_config
    from meshlm.plan.auto import resolve_auto_layout

    check_nproc(args.nproc, max_restarts=args.max_restarts)
    args.interrupt_hint = "completed checkpoints are kept: add --resume auto to continue from the newest one"
    if args.init_from_hf:
        args.overrides.append(f"train.init_from_hf={_quoted(args.init_from_hf)}")
    cfg = load_training_config(args.config, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / Path(args.config or "tiny-cpu").stem
    if args.nproc is not None:
        from meshlm.artifacts.run_dir import check_run_dir
        from meshlm.data.prepare import check_data_source
        from meshlm.distributed.launch import launch_local, strip_launch_args

        # Every layout, run-directory and data-source error is reported once, here, before any
        # worker starts (the corpus itself is read by rank 0 of the workers).
        if cfg.parallel.auto:
            resolve_auto_layout(cfg, args.nproc)  # measures this machine once; the workers reuse it
        parallel_dims_from_config(cfg, args.nproc)
        check_run_dir(out, cfg, args.overwrite)
        check_data_source(cfg.data, cfg.model.vocab_size)
        return launch_local(
            args.nproc, strip_launch_args(sys.argv[1:] if args.argv is None else args.argv), args.max_restarts
        )
    from meshlm.inference.simple_generate import end_of_run_sample
    from meshlm.train.trainer import train

    env = read_launch_env()
    if cfg.parallel.auto:
        init_distributed(env, cfg.train.collective_timeout_s)  # under torchrun: rank 0 plans and tells the others
        resolve_auto_layout(cfg, env.world_size, log=print if env.is_main else lambda *a, **k: None)
    # A collective that fails because another node died or cannot be reached names that node.
    with explain_peer_failures(env, cfg.train.collective_timeout_s):
        train(cfg, out, overwrite=args.overwrite, env=env, resume=args.resume, sampler=end_of_run_sample)
    if env.distributed:
        shutdown_distributed(exit_process=True)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from meshlm.train.checkpoint import export_checkpoint

    export_checkpoint(Path(args.run), Path(args.out), step=args.step)
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from meshlm.data.prepare import prepare_data

    overrides = list(args.overrides)
    if args.source:
        overrides.append(f"data.source={_quoted(args.source)}")
    if args.out:
        overrides.append(f"data.dir={_quoted(args.out)}")
    cfg = load_config(args.config, overrides)
    out = prepare_data(cfg.data, cfg.model.vocab_size)
    print(f"prepared {out}")
    return 0


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cmd_config_show(args: argparse.Namespace) -> int:
    print(load_config(args.config, args.overrides).to_toml(), end="")
    return 0


def _raise_on_sigterm(signum, frame) -> None:
    raise Terminated()


def _report(error: BaseException, code: int) -> int:
    """Print a user-facing error once (a rank that re-raises rank 0's error stays quiet)."""
    if not getattr(error, REPORTED_BY_RANK0, False):
        print(f"meshlm: error: {error}", file=sys.stderr)
    return code


def _os_error_message(error: OSError) -> str:
    """One paragraph for an OSError that escaped the checks before work (a disk that filled up,
    a directory removed or made read-only meanwhile)."""
    where = f" at {error.filename}" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full{where} ({error.strerror}). Free some space and run the command again."
    return (
        f"{error.strerror or error}{where} (errno {error.errno}). The file system refused a write or a read "
        f"during the work; check the path and run the command again."
    )


def main(argv: list[str] | None = None) -> int:
    """Exit codes (docs/reliability.md): 0 success; 2 a user error found before work; 1 a
    failure during work, with a message; 130 / 143 interrupted by SIGINT / SIGTERM."""
    args = build_parser().parse_args(argv)
    args.argv = argv
    # SIGTERM unwinds like Ctrl-C (finally blocks remove temporary files, close outputs), except
    # for a command that handles it itself (set_defaults(handles_sigterm=True): a server drains).
    own_handler = threading.current_thread() is threading.main_thread() and not getattr(args, "handles_sigterm", False)
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if own_handler else None
    try:
        return args.func(args)
    except ConfigError as e:
        _record_for_launcher(e)
        code = _report(e, EXIT_USER_ERROR)
    except RunError as e:
        _record_for_launcher(e)
        code = _report(e, EXIT_FAILURE)
    except KeyboardInterrupt as e:  # Ctrl-C, or Terminated (SIGTERM)
        code = _interrupted(e, args)
    except OSError as e:
        error = RunError(_os_error_message(e))
        _record_for_launcher(error)
        code = _report(error, EXIT_FAILURE)
    except Exception as e:
        if not _peer_lost(e):
            _record_for_launcher(e)
            raise
        # Ctrl-C reaches every rank of a local world at once; a rank blocked in a collective may
        # first see its peer, interrupted already, close the connection. Its own interrupt is on
        # the way: wait for it briefly and leave as interrupted, not with the peer's error.
        try:
            time.sleep(PEER_LOST_GRACE_S)
        except KeyboardInterrupt as interrupt:
            code = _interrupted(interrupt, args)
        else:
            _record_for_launcher(e)
            raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if "torch.distributed" in sys.modules:  # (commands such as `config show` never load torch)
        from meshlm.distributed.process_group import exit_now_if_distributed

        exit_now_if_distributed(code)
    return code


PEER_LOST_GRACE_S = 2.0


def _peer_lost(error: Exception) -> bool:
    """A collective failed because another rank's process went away (gloo's message)."""
    text = str(error)
    return isinstance(error, RuntimeError) and ("reset by peer" in text or "closed by peer" in text)


def _interrupted(error: KeyboardInterrupt, args) -> int:
    _record_for_launcher(error)
    from meshlm.distributed.env import is_meshlm_worker, read_launch_env

    code = EXIT_SIGTERM if isinstance(error, Terminated) else EXIT_SIGINT
    # Under meshlm's launcher the launcher says it, once; under torchrun, rank 0 does.
    if not is_meshlm_worker() and read_launch_env().is_main:
        what = "SIGTERM" if code == EXIT_SIGTERM else "SIGINT"
        hint = getattr(args, "interrupt_hint", "")
        print(f"meshlm: interrupted ({what}){'; ' + hint if hint else ''}", file=sys.stderr)
    return code


def _record_for_launcher(error: BaseException) -> None:
    """Under torch.distributed.run, write the error to the file the elastic agent reads (its
    TORCHELASTIC_ERROR_FILE), so the launching process (`--nproc`, the Python API's workers=)
    can name the failed rank and its message; a no-op otherwise. Called inside `except`."""
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(error)


if __name__ == "__main__":
    sys.exit(main())

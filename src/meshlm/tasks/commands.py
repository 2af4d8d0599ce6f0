"""CLI of the task side: `meshlm finetune`, and `meshlm eval` / `meshlm predict` for task models.

`eval` and `predict` are the inference commands; a run directory that holds a task model (a
[task] section in its config.toml) is handed to the task side here instead, so one command
name serves both kinds of run. Several processes (`--nproc N`) start through
torch.distributed.run as `meshlm train --nproc` does; every user error is raised before.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from meshlm.config import ConfigError
from meshlm.utils.paths import output_dir_problem, output_file_problem


def add_commands(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune a task model (classify, ner, srl) on any backbone, under any layout")
    p.add_argument("--task", required=True, choices=["classify", "ner", "srl"])
    p.add_argument("--train", default=None, help="training data (default: the task's built-in dataset)")
    p.add_argument("--valid", default=None, help="validation data (default: the built-in dataset's)")
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--from", dest="from_run", default=None, metavar="RUN_DIR", help="a `meshlm train` run as backbone"
    )
    src.add_argument("--init-from-hf", default=None, metavar="HF_DIR", help="a local Hugging Face model as backbone")
    p.add_argument("--out", required=True, help="the task run directory")
    p.add_argument("--nproc", type=int, default=None, help="start N local worker processes")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="auto|CHECKPOINT_DIR",
        help="continue an interrupted run in --out from its newest checkpoint (auto), or from the checkpoint given",
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a key"
    )
    p.set_defaults(func=cmd_finetune)
    for name, handler in (("eval", cmd_eval), ("predict", cmd_predict)):
        parser = sub.choices[name]
        parser.set_defaults(func=_dispatch(handler, parser.get_default("func")))


def _dispatch(task_handler, lm_handler):
    def run(args: argparse.Namespace) -> int:
        from meshlm.tasks.config import is_task_run

        if getattr(args, "run", None) and is_task_run(args.run):
            return task_handler(args)
        return lm_handler(args)

    return run


def _argv(args) -> list[str]:
    return sys.argv[1:] if args.argv is None else list(args.argv)


def _launch(nproc: int, args) -> int:
    from meshlm.distributed.launch import launch_local, strip_launch_args

    return launch_local(nproc, strip_launch_args(_argv(args)))


def _finish(env, code: int = 0) -> int:
    """Leave the process group (every rank) and return, or exit with, `code`."""
    if env.distributed:
        from meshlm.distributed.process_group import shutdown_distributed

        shutdown_distributed(exit_process=True, code=code)
    return code


def _data_files(args, cache_dir: str) -> tuple[Path, Path]:
    if (args.train is None) != (args.valid is None):
        raise ConfigError("pass both --train and --valid, or neither (the task's built-in dataset).")
    if args.train is not None:
        return Path(args.train), Path(args.valid)
    from meshlm.tasks.datasets import builtin_files

    files = builtin_files(args.task, Path(cache_dir))
    return files["train"], files["valid"]


def cmd_finetune(args: argparse.Namespace) -> int:
    import tomllib

    from meshlm.config import DataConfig
    from meshlm.distributed.env import read_launch_env
    from meshlm.distributed.launch import check_nproc
    from meshlm.tasks.finetune import backbone_run, finetune, finetune_config

    env = read_launch_env()
    check_nproc(args.nproc)
    args.interrupt_hint = (
        f"the newest checkpoint in {args.out}/checkpoints (one after each validation) is kept; continue with the "
        f"same command and --resume auto (none is written before the first validation)"
    )
    if env.is_main or not env.distributed:
        problem = output_dir_problem(Path(args.out))
        if problem:
            raise ConfigError(f"cannot write --out: {problem}. Choose another --out.")
        _check_restart(Path(args.out), args.resume)
    cache = DataConfig().cache_dir  # where the default backbone and the built-in datasets live
    for item in args.overrides:
        key, _, value = item.partition("=")
        if key.strip() == "data.cache_dir":
            try:
                cache = str(tomllib.loads(f"v = {value.strip()}")["v"])
            except tomllib.TOMLDecodeError:
                cache = value.strip()
    launching = args.nproc is not None and args.nproc > 1 and not env.distributed
    if env.is_main or not env.distributed:
        train, valid = _data_files(args, cache)
        backbone = backbone_run(args.from_run, args.init_from_hf, cache)
    if env.distributed:  # rank 0 made the files above; the others find them now
        from meshlm.distributed.process_group import init_distributed
        from meshlm.distributed.rank_zero import broadcast_from_rank0

        init_distributed(env)
        train, valid, backbone = broadcast_from_rank0(
            (train, valid, backbone) if env.is_main else None, distributed=True
        )
    world = args.nproc if launching else env.world_size
    cfg = finetune_config(args.task, train, backbone, args.overrides, world_size=world)
    if launching:
        from meshlm.tasks.formats import read_examples

        read_examples(valid, args.task)  # a bad validation file is reported here, once, before any worker
        return _launch(args.nproc, args)
    finetune(cfg, train, valid, Path(args.out), env=env, resume=args.resume)
    _finish(env)
    return 0


def _check_restart(out: Path, resume: str | None) -> None:
    """A fresh run into a directory holding an earlier run's checkpoints would mix the two (and
    a later --resume auto would pick the wrong one): refused, naming both ways on."""
    from meshlm.train.checkpoint_manifest import checkpoints_dir, list_checkpoints

    if resume is None and list_checkpoints(out):
        raise ConfigError(
            f"--out {out} holds checkpoints of an earlier fine-tuning run ({checkpoints_dir(out)}). Continue that run "
            f"with --resume auto, or start a new one in another --out (or delete {checkpoints_dir(out)} first)."
        )


def _setup(args, nproc: int):
    from meshlm.distributed.env import read_launch_env
    from meshlm.distributed.launch import check_nproc
    from meshlm.distributed.process_group import init_distributed

    env = read_launch_env()
    check_nproc(nproc)
    if not env.distributed and nproc > 1:
        return env, _launch(nproc, args)
    init_distributed(env)
    return env, None


def cmd_eval(args: argparse.Namespace) -> int:
    from meshlm.inference.quantize import quantize_linears
    from meshlm.tasks.evaluate import evaluate_file, headline, write_eval_files
    from meshlm.tasks.predict import load_task_model

    _check_input("--data", Path(args.data), "a labelled file of the run's task")
    problem = output_dir_problem(Path(args.run))  # the scores are written into the run directory
    if problem:
        raise ConfigError(f"cannot write the scores into --run: {problem}. Copy the run somewhere writable.")
    env, code = _setup(args, 1 if args.nproc is None else args.nproc)
    if code is not None:
        return code
    loaded = load_task_model(args.run, env.device, verify=not args.no_verify)
    quantize_linears(loaded.model, args.quantize)  # in place: this process's copy of the weights
    scores = evaluate_file(loaded, args.data, env.rank, env.world_size)
    if env.is_main:
        write_eval_files(args.run, scores, loaded.cfg.task.labels)
        short = headline(scores)
        if args.output:
            Path(args.output).write_text(json.dumps(short) + "\n")
        if args.json:
            print(json.dumps(short))
        else:
            from meshlm.tasks.metrics import per_type_table

            print(per_type_table(scores), end="")
            print("  ".join(f"{k} {v:.4f}" for k, v in short.items() if k != "task"))
    _finish(env)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from meshlm.artifacts.weights_manifest import weights_sha256
    from meshlm.distributed.env import read_launch_env
    from meshlm.inference.commands import report_predict_summary
    from meshlm.inference.predict_settings import check_same_settings, write_settings
    from meshlm.inference.quantize import quantize_linears
    from meshlm.tasks.predict import load_task_model, predict_file
    from meshlm.utils.file_hash import file_sha256

    args.interrupt_hint = f"the answers so far are kept in {args.output}: run the same command again to continue"
    _check_input("--input", Path(args.input), 'a JSONL file with one {"text": ...} (or "tokens") per line')
    output = Path(args.output)
    problem = output_file_problem(output)
    if problem:
        raise ConfigError(f"cannot write --output: {problem}. Choose another --output.")
    # What changes an answer (a task model has no generation settings): the weights, the
    # tokenizer and their quantization. Answers of another model are refused before any work,
    # as for a language model.
    run = Path(args.run)
    settings = {
        "model_sha256": weights_sha256(run / "model.safetensors"),
        "tokenizer_sha256": file_sha256(run / "tokenizer.json"),
        "quantize": args.quantize,
    }
    env = read_launch_env()
    if env.is_main:
        if args.overwrite:
            output.unlink(missing_ok=True)
        else:
            check_same_settings(output, settings)
    env, code = _setup(args, 1 if args.nproc is None else args.nproc)
    if code is not None:
        return code
    loaded = load_task_model(args.run, env.device, verify=not args.no_verify)
    quantize_linears(loaded.model, args.quantize)  # in place: this process's copy of the weights
    if env.is_main:
        write_settings(output, settings)
    summary = predict_file(loaded, args.input, args.output, env.rank, env.world_size)
    code = 0 if summary is None else report_predict_summary(summary, args.input)
    return _finish(env, code)


def _check_input(flag: str, path: Path, wanted: str) -> None:
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; pass {wanted}.")
    if not path.is_file():
        raise ConfigError(f"{flag} file {path} not found; pass {wanted}.")

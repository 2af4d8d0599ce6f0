"""CLI subcommands of the inference side: `meshlm generate`, `meshlm predict`, `meshlm eval`.

Several processes: `--tp N` (generate), `--nproc N [--tp T]` (predict), `--nproc N` (eval)
start the workers through torch.distributed.run (as `train --nproc` does) unless the
command already runs under a launcher (torchrun sets WORLD_SIZE); every worker reads the
launch environment, and only global rank 0 reads the input and writes the output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from meshlm.config import ConfigError


def add_commands(sub) -> None:
    p = sub.add_parser("generate", help="continue prompts with a trained model (streams to the terminal)")
    _add_model_args(p)
    p.add_argument("--prompt", action="append", default=[], help="prompt text; repeatable")
    p.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help='prompts file: one prompt per line, or a .jsonl file with a "prompt" per line',
    )
    _add_sampling_args(p, temperature=0.8)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (starts N local processes)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "predict", help="batch inference over a JSONL file of prompts, or of texts for a task model (resumable)"
    )
    _add_model_args(p)
    p.add_argument(
        "--input",
        required=True,
        metavar="IN.jsonl",
        help='one JSON object per line with a "prompt" (a task model: "text", "tokens", "predicate")',
    )
    p.add_argument("--output", required=True, metavar="OUT.jsonl", help="answers in input order; re-running resumes")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="discard the answers already in OUT (e.g. made with another model or settings) and start over",
    )
    _add_sampling_args(p, temperature=0.0)
    p.add_argument("--nproc", type=int, default=None, help="processes: nproc / tp data-parallel groups")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per group")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "eval", help="loss and perplexity of a model on a corpus; a task model's accuracy / span F1 on labelled data"
    )
    _add_model_args(p)
    p.add_argument(
        "--data",
        required=True,
        metavar="SRC",
        help="corpus: a directory, 'GLOB', a text/.jsonl/.parquet file or python-stdlib",
    )
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's data.seq_len)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    p.add_argument("--max-bytes", type=int, default=0, help="read at most this many bytes of the corpus (0 = all)")
    p.add_argument("--nproc", type=int, default=None, help="data-parallel processes")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--output", default=None, metavar="FILE.json", help="also write the result to FILE as JSON")
    p.set_defaults(func=cmd_eval)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        default=None,
        # --run-dir: under torchrun, whose parser reads a bare --run as an abbreviation of its --run-path
        help="run directory written by `meshlm train` (--run-dir: the same, for torchrun command lines)",
    )
    src.add_argument(
        "--init-from-hf",
        metavar="HF_DIR",
        default=None,
        help="a local Hugging Face model directory (Llama, Mistral, GPT-2), converted on the fly",
    )
    src.add_argument(
        "--checkpoint",
        default=None,
        help="a model.safetensors with config.toml and tokenizer.json next to it (or above it)",
    )
    add_precision_args(p)
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the sha256 check of the weights against their manifest (for very large files; the size is "
        "still checked)",
    )


def add_precision_args(p: argparse.ArgumentParser) -> None:
    """--dtype and --quantize, the same for every command that runs a model (serve too)."""
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--quantize",
        default="none",
        choices=["none", "int8"],
        help="int8: run the linear layers with int8 weights (docs/performance.md)",
    )


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string; repeatable")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")


def _sampling(args: argparse.Namespace):
    from meshlm.inference.sampling import SamplingParams

    try:
        return SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            stop=tuple(args.stop),
            stop_token_ids=(),
        )
    except ValueError as e:
        raise ConfigError(f"sampling options: {e}.") from None


def _with_end_of_text(params, tokenizer, args: argparse.Namespace):
    """Stop at the tokenizer's own end-of-text token (meshlm's <|endoftext|>, or an imported
    model's </s>, ...) unless --ignore-eos; a tokenizer without one stops at the length or a stop string."""
    import dataclasses

    from meshlm.data.tokenizer import end_of_text_id

    eot = end_of_text_id(tokenizer)
    if args.ignore_eos or eot is None:
        return params
    return dataclasses.replace(params, stop_token_ids=(eot,))


def _argv(args: argparse.Namespace) -> list[str]:
    return sys.argv[1:] if args.argv is None else list(args.argv)


def _launch(nproc: int, args: argparse.Namespace) -> int:
    from meshlm.distributed.launch import launch_local, strip_launch_args

    return launch_local(nproc, strip_launch_args(_argv(args)))


def _prepare(args: argparse.Namespace, tp: int, nproc: int, before_launch=None):
    """Check the model files and the layout (and `before_launch(files)`: the command's own
    checks) before any worker starts. Returns the files and None, or the exit code of the
    launched workers."""
    from meshlm.artifacts.run_dir import load_run_config
    from meshlm.distributed.env import read_launch_env
    from meshlm.distributed.launch import check_nproc
    from meshlm.inference.loading import check_layout, find_model_files
    from meshlm.inference.quantize import check_quantizable

    check_nproc(nproc, "--nproc" if getattr(args, "nproc", None) is not None else "--tp")
    check_nproc(tp, "--tp")
    if args.init_from_hf:
        args.run = str(_converted_hf_run(Path(args.init_from_hf)))
    files = find_model_files(args.run, args.checkpoint)
    env = read_launch_env()
    world = env.world_size if env.distributed else nproc
    model_cfg = load_run_config(files.config.parent).model
    check_layout(world, tp, model_cfg)
    check_quantizable(model_cfg, args.quantize)
    if before_launch is not None:
        before_launch(files)
    if not env.distributed and nproc > 1:
        return files, _launch(nproc, args)
    return files, None


def _converted_hf_run(hf_dir: Path) -> Path:
    """A meshlm run directory for a Hugging Face model, converted once into a cache folder keyed
    by the directory's config and weights (each rank of a --tp launch finds it there)."""
    import hashlib
    import tempfile

    from meshlm.interop.convert import import_hf
    from meshlm.interop.hf_files import hf_weight_files

    files = [hf_dir / "config.json", *hf_weight_files(hf_dir)]
    key = hashlib.sha256("|".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files).encode())
    out = Path(tempfile.gettempdir()) / f"meshlm-hf-{key.hexdigest()[:16]}"
    if not (out / "model.safetensors").is_file():
        staging = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
        import_hf(hf_dir, staging, overwrite=True)
        try:
            staging.rename(out)
        except OSError:  # another rank got there first
            pass
    return out


def _finish(layout, code: int = 0) -> int:
    """Leave the process group (every rank) and return, or exit with, `code`."""
    if layout.env.distributed:
        from meshlm.distributed.process_group import shutdown_distributed

        shutdown_distributed(exit_process=True, code=code)
    return code


def _engine(args: argparse.Namespace, files, layout):
    from meshlm.inference.engine import Engine
    from meshlm.inference.loading import DTYPES, load_model

    loaded = load_model(files, layout.env.device, DTYPES[args.dtype], layout.tp_group, verify=not args.no_verify)
    return Engine(
        loaded.model, loaded.tokenizer, max_batch=args.max_batch, tp_group=layout.tp_group, quantize=args.quantize
    )


# ----------------------------------------------------------------------------- generate


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        path = Path(args.prompts)
        if path.is_dir():
            raise ConfigError(f"--prompts {path} is a directory; pass a file with one prompt per line (or a .jsonl).")
        if not path.is_file():
            raise ConfigError(f"prompts file {path} not found.")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    obj = None
                if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                    raise ConfigError(f'{path} line {number}: expected a JSON object with a string "prompt".')
                prompts.append(obj["prompt"])
            else:
                prompts.append(line)
    if not prompts:
        raise ConfigError("pass --prompt TEXT (repeatable) or --prompts FILE.")
    return prompts


class _InOrderPrinter:
    """Streams the requests' text in request order: request i's tokens are written as they
    come; later requests are buffered until every earlier one has finished."""

    def __init__(self, prompts: list[str], out=None):
        self.prompts, self.out = prompts, out or sys.stdout
        self.buffers = [""] * len(prompts)
        self.finished = [False] * len(prompts)
        self.cursor = 0
        self._write(self._header(0))

    def _header(self, i: int) -> str:
        return ("\n" if i else "") + self.prompts[i]

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()

    def __call__(self, event) -> None:
        i = event.index
        if i == self.cursor:
            self._write(event.text)
        else:
            self.buffers[i] += event.text
        if event.finished:
            self.finished[i] = True
            while self.cursor < len(self.prompts) and self.finished[self.cursor]:
                self._write("\n")
                self.cursor += 1
                if self.cursor < len(self.prompts):
                    self._write(self._header(self.cursor) + self.buffers[self.cursor])
                    self.buffers[self.cursor] = ""


def cmd_generate(args: argparse.Namespace) -> int:
    from meshlm.distributed.env import read_launch_env
    from meshlm.inference.engine import Request
    from meshlm.inference.loading import broadcast_object, setup_layout

    params = _sampling(args)
    files, code = _prepare(args, args.tp, args.tp)
    if code is not None:
        return code
    env = read_launch_env()
    if env.world_size != args.tp:
        raise ConfigError(
            f"generate runs on exactly --tp ranks: the launcher started {env.world_size}, --tp is {args.tp}."
        )
    layout = setup_layout(env, args.tp)
    prompts = broadcast_object(_read_prompts(args) if layout.is_main else None, layout)
    engine = _engine(args, files, layout)
    params = _with_end_of_text(params, engine.tokenizer, args)
    requests = [Request(engine.tokenizer.encode(p).ids, params) for p in prompts]
    try:
        for r in requests:
            engine.check(r)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    printer = _InOrderPrinter(prompts) if layout.is_main else None
    engine.generate(requests, on_event=printer)
    return _finish(layout)


# ----------------------------------------------------------------------------- predict


def _check_predict_paths(args: argparse.Namespace) -> None:
    """The input must be a file and the output writable, before any work."""
    from meshlm.utils.paths import output_file_problem

    source = Path(args.input)
    if source.is_dir():
        raise ConfigError(f'--input {source} is a directory; pass a JSONL file with one {{"prompt": ...}} per line.')
    if not source.is_file():
        raise ConfigError(f"--input file {source} not found.")
    problem = output_file_problem(Path(args.output))
    if problem:
        raise ConfigError(f"cannot write --output: {problem}. Choose another --output.")


def cmd_predict(args: argparse.Namespace) -> int:
    from meshlm.distributed.env import read_launch_env
    from meshlm.inference.loading import setup_layout
    from meshlm.inference.predict import run_predict
    from meshlm.inference.predict_settings import answer_settings, check_same_settings

    args.interrupt_hint = f"the answers so far are kept in {args.output}: run the same command again to continue"
    defaults = _sampling(args)
    _check_predict_paths(args)
    settings: dict = {}

    def same_settings(files) -> None:  # before any worker starts: never mix two runs' answers
        settings.update(answer_settings(args, files.weights, files.tokenizer))
        if not args.overwrite:
            check_same_settings(Path(args.output), settings)

    nproc = args.nproc if args.nproc is not None else args.tp
    files, code = _prepare(args, args.tp, nproc, before_launch=same_settings)
    if code is not None:
        return code
    layout = setup_layout(read_launch_env(), args.tp)
    engine = _engine(args, files, layout)
    defaults = _with_end_of_text(defaults, engine.tokenizer, args)
    base_seed = defaults.seed
    import dataclasses

    defaults = dataclasses.replace(defaults, seed=None)
    summary = run_predict(
        args.input if layout.is_main else None,
        args.output if layout.is_main else None,
        engine,
        layout,
        defaults,
        base_seed,
        progress=not args.no_progress,
        settings=settings,
        start_over=args.overwrite,
    )
    code = 0 if summary is None else report_predict_summary(summary, args.input)
    return _finish(layout, code)


def report_predict_summary(summary, input_path: str) -> int:
    """Print predict's summary line (the main rank); the exit code: 1 when no line of the input
    succeeded (each failed line's error field says why), else 0."""
    print(
        f"predict: {summary.answered} answered, {summary.skipped} already in {summary.output}, "
        f"{summary.errors} failed line(s){' (see their error field)' if summary.errors else ''}",
        file=sys.stderr,
    )
    if summary.errors and not summary.answered and not summary.skipped:
        print(
            f"meshlm: error: no line of {input_path} succeeded ({summary.errors} failed); their error fields in "
            f"{summary.output} say why.",
            file=sys.stderr,
        )
        return 1
    return 0


# ----------------------------------------------------------------------------- eval


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from meshlm.distributed.env import read_launch_env
    from meshlm.inference.evaluate import evaluate_tokens, tokenize_corpus
    from meshlm.inference.loading import DTYPES, load_model, setup_layout
    from meshlm.inference.quantize import quantize_linears

    files, code = _prepare(args, 1, 1 if args.nproc is None else args.nproc)
    if code is not None:
        return code
    layout = setup_layout(read_launch_env(), 1)
    loaded = load_model(files, layout.env.device, DTYPES[args.dtype], verify=not args.no_verify)
    quantize_linears(loaded.model, args.quantize)  # in place: this process's copy of the weights
    seq_len = args.seq_len or min(loaded.cfg.data.seq_len, loaded.cfg.model.max_seq_len)
    if seq_len < 1 or args.batch_size < 1:
        raise ConfigError("--seq-len and --batch-size must be at least 1.")
    tokens = tokenize_corpus(args.data, loaded.tokenizer, args.max_bytes) if layout.is_main else None
    if layout.env.distributed:  # rank 0 reads the corpus; the others get its tokens
        import torch.distributed as dist

        n = torch.tensor([0 if tokens is None else len(tokens)], device=layout.env.device)
        dist.broadcast(n, src=0)
        if tokens is None:
            tokens = torch.empty(int(n.item()), dtype=torch.long)
        buf = tokens.to(layout.env.device)
        dist.broadcast(buf, src=0)
        tokens = buf.cpu()
    result = evaluate_tokens(loaded.model, tokens, seq_len, args.batch_size, layout.env.rank, layout.env.world_size)
    if layout.is_main:
        if args.output:
            Path(args.output).write_text(json.dumps(result.to_dict()) + "\n")
        if args.json:
            print(json.dumps(result.to_dict()))
        else:
            print(
                f"loss {result.loss:.6f}  perplexity {result.perplexity:.4f}  "
                f"({result.tokens:,} tokens in {result.windows:,} windows of {result.seq_len})"
            )
    return _finish(layout)

"""Load balance of `meshlm predict`: a skewed input against a uniform one, and --nproc 2 against 1.

Workload (issue 20): a ~25M-parameter llama (random weights, --ignore-eos so every answer is
exactly its max_new_tokens), 96 prompts (--prompts), --max-batch 4, greedy, 1 thread per rank.
  skewed:  1 prompt in 8 asks for 224 new tokens, the others for 16
  uniform: every prompt asks for 42 (the same 4032 tokens in total)
Each command's start-up (processes, model load) is measured with a one-token run (one prompt,
one new token) and subtracted: work time = wall time - start-up. Reported, as medians of
alternating rounds (the machine is shared and noisy):
  skewed / uniform work time at --nproc 1 (target <= 1.2)
  parallel efficiency t1 / (2 t2) of --nproc 2 on work time, per input (target >= 0.85)

Several source trees can be measured side by side (before / after a change):

    python benchmarks/predict_balance.py --rounds 3 --tree before=/path/to/old/src --tree after=src
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_PROMPTS, LONG, SHORT, UNIFORM = 96, 224, 16, 42


def make_run(folder: Path) -> Path:
    """A run directory (config, weights, tokenizer) of a ~25M-parameter llama, made once."""
    run = folder / "run"
    if (run / "model.safetensors").is_file():
        return run
    import codecs
    import json as json_module
    import textwrap

    from meshlm.artifacts.weights_file import save_weights
    from meshlm.config import Config
    from meshlm.data.tokenizer import train_tokenizer
    from meshlm.model.registry import build_model, family_spec
    from meshlm.model.transformer.config import TransformerConfig

    cfg = TransformerConfig(arch="llama", d_model=512, n_layers=6, n_heads=8, vocab_size=6144, max_seq_len=512)
    print(f"model: {family_spec(cfg).count_params(cfg) / 1e6:.1f}M parameters", flush=True)
    run.mkdir(parents=True, exist_ok=True)
    save_weights(build_model(cfg, seed=0).state_dict(), cfg, run / "model.safetensors")
    # Only the [model] table: a source tree from before later config keys (--tree) reads it too.
    toml = Config(model=cfg).to_toml()
    (run / "config.toml").write_text(toml[: toml.index("\n[data]")] + "\n")
    text = "".join(inspect.getsource(m) for m in (json_module.decoder, textwrap, codecs, argparse, inspect))
    train_tokenizer([text], cfg.vocab_size, run / "tokenizer.json")
    return run


def prompts(n: int) -> list[str]:
    words = inspect.getsource(argparse).split()
    return [" ".join(words[i * 7 : i * 7 + 12]) for i in range(n)]


def write_inputs(folder: Path, n: int) -> dict[str, Path]:
    texts = prompts(n)
    lengths = {
        "skewed": [LONG if i % 8 == 3 else SHORT for i in range(n)],
        "uniform": [UNIFORM] * n,
        "startup": [1],
    }
    assert sum(lengths["skewed"]) == sum(lengths["uniform"])
    paths = {}
    for name, counts in lengths.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text(
            "".join(json.dumps({"prompt": texts[i], "max_new_tokens": n}) + "\n" for i, n in enumerate(counts))
        )
    return paths


def run_predict(src: str, run: Path, source: Path, nproc: int, out: Path) -> float:
    out.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.abspath(src), "MESHLM_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "meshlm", "predict", "--run", str(run), "--input", str(source)]
    cmd += ["--output", str(out), "--max-batch", "4", "--ignore-eos", "--no-progress"]
    cmd += ["--nproc", str(nproc)] if nproc > 1 else []
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=SRC", help="source tree (repeatable)")
    parser.add_argument("--prompts", type=int, default=N_PROMPTS, help="a multiple of 8 (fewer on a loaded machine)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "meshlm-predict-balance"))
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree) or {"this": "src"}
    folder = Path(args.workdir)
    folder.mkdir(parents=True, exist_ok=True)
    run = make_run(folder)
    inputs = write_inputs(folder, args.prompts)
    times: dict[tuple, list[float]] = {}
    outputs: dict[tuple, str] = {}
    for r in range(args.rounds):
        for tree, src in trees.items():
            for nproc in (1, 2):
                for name, source in inputs.items():
                    out = folder / f"out-{tree}-{nproc}-{name}.jsonl"
                    wall = run_predict(src, run, source, nproc, out)
                    times.setdefault((tree, nproc, name), []).append(wall)
                    outputs[(tree, nproc, name)] = out.read_text()
                    print(f"round {r + 1} {tree} nproc {nproc} {name}: {wall:.1f} s", flush=True)
    print(f"\nmedians of {args.rounds} round(s), seconds (work = wall - start-up)")
    for tree in trees:
        med = {(n, name): statistics.median(times[(tree, n, name)]) for n in (1, 2) for name in inputs}
        work = {(n, name): med[(n, name)] - med[(n, "startup")] for n in (1, 2) for name in ("skewed", "uniform")}
        for n in (1, 2):
            print(
                f"{tree} --nproc {n}: start-up {med[(n, 'startup')]:.1f}, skewed work {work[(n, 'skewed')]:.1f}, "
                f"uniform work {work[(n, 'uniform')]:.1f}"
            )
        print(f"{tree}: skewed / uniform at --nproc 1 = {work[(1, 'skewed')] / work[(1, 'uniform')]:.2f}")
        for name in ("skewed", "uniform"):
            same = outputs[(tree, 1, name)] == outputs[(tree, 2, name)]
            print(
                f"{tree}: efficiency --nproc 2 on {name} = {work[(1, name)] / (2 * work[(2, name)]):.2f} "
                f"(output equal to --nproc 1: {same})"
            )


if __name__ == "__main__":
    main()

"""Peak memory of `meshlm data prepare` on a corpus whose main document is one long line.

Writes a corpus of one single-line document of --mb MB (words, punctuation, numbers and spaces
drawn with a fixed seed, no newline) plus a short second document, then runs
`meshlm data prepare` on it in a child process and reports the child's peak resident set
size (getrusage of the children) and wall time. Run it once against each source tree to
compare (e.g. before and after a change):

    python benchmarks/prepare_memory.py --mb 50                      # this checkout
    python benchmarks/prepare_memory.py --mb 50 --src ../other/src   # another checkout

The token files of the two runs can be compared with --keep DIR (same tokens expected).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def write_corpus(root: Path, megabytes: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    tails = ["", " ", "  ", ", ", ". ", "(", ")", " 12 "]
    target = megabytes << 20
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "one-line.txt", "w") as f:
        written = 0
        while written < target:
            chunk = " ".join(rng.choice(words) + rng.choice(tails) for _ in range(10_000)) + " "
            f.write(chunk)
            written += len(chunk)
    (root / "short.txt").write_text("a second, short document.\n" * 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=50, help="size of the single-line document in MB")
    parser.add_argument("--src", default=str(Path(__file__).resolve().parents[1] / "src"), help="meshlm source tree")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--keep", default=None, help="prepare into this directory (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        write_corpus(corpus, args.mb)
        out = Path(args.keep) if args.keep else Path(tmp) / "prepared"
        env = {**os.environ, "PYTHONPATH": args.src, "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "meshlm", "data", "prepare", "--source", str(corpus), "--out", str(out)]
        command += ["--set", f"model.vocab_size={args.vocab}", "--set", "data.max_bytes=0"]
        started = time.perf_counter()
        subprocess.run(command, check=True, env=env)
        elapsed = time.perf_counter() - started
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # kilobytes on Linux
    print(f"single-line document of {args.mb} MB, src {args.src}: peak RSS {peak_mib:,.0f} MiB, {elapsed:.0f} s")


if __name__ == "__main__":
    main()

"""python -m meshlm.tasks.baselines --method M --task T --train FILE --test FILE: one JSON line."""

from __future__ import annotations

import argparse
import json

from meshlm.tasks.baselines import run
from meshlm.tasks.formats import read_examples


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m meshlm.tasks.baselines")
    p.add_argument("--method", required=True, choices=["tfidf-lr", "maxent", "crf", "hmm"])
    p.add_argument("--task", required=True, choices=["classify", "ner", "srl"])
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    args = p.parse_args()
    train, _ = read_examples(args.train, args.task)
    test, _ = read_examples(args.test, args.task)
    result = run(args.method, args.task, train, test)
    result["scores"].pop("per_type", None)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

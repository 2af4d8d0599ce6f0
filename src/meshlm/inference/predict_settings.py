"""What produced a predictions file, recorded beside it, so that a resumed `meshlm predict` never
mixes answers of two models or two sets of generation settings.

    answers.jsonl                  the answers
    answers.jsonl.settings.json    {"format": 1, "settings": {...}}: everything that changes an
                                   answer: the weights' and tokenizer's sha256, the dtype, and the
                                   command line's generation defaults (max new tokens, temperature,
                                   top-k, top-p, repetition penalty, stop strings, seed, ignore-eos)

Not recorded: --nproc, --tp and --max-batch, which never change an answer (each line's seed
comes from --seed and its line number, and batching is exact). A line's own fields (its
"temperature", "seed", ...) are part of the line, which resume compares as well.

A re-run with other settings is refused before any work, naming what differs and --overwrite,
which starts over. An output that has answers but no settings file (written by another tool,
or the file was deleted) is refused the same way: where its answers came from is unknown.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from meshlm.artifacts.weights_manifest import weights_sha256
from meshlm.config import ConfigError
from meshlm.utils.file_hash import file_sha256

FORMAT = 1
SUFFIX = ".settings.json"
ANSWER_SETTINGS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "stop",
    "seed",
    "ignore_eos",
    "dtype",
)


def settings_path(output: Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + SUFFIX)


def answer_settings(args, weights: Path, tokenizer: Path) -> dict:
    """The settings of a predict command line (argparse namespace) that change its answers."""
    settings = {key: getattr(args, key) for key in ANSWER_SETTINGS}
    settings["stop"] = list(settings["stop"])
    settings["model_sha256"] = weights_sha256(weights)
    settings["tokenizer_sha256"] = file_sha256(Path(tokenizer))
    return settings


def has_answers(output: Path) -> bool:
    """Does `output` hold at least one answered line?"""
    if not Path(output).is_file():
        return False
    with open(output, encoding="utf-8", errors="replace") as f:
        for text in f:
            try:
                record = json.loads(text)
            except json.JSONDecodeError:
                continue
            # an answered line: a language model's {"text"}, a task model's {"label"} / {"tags"}
            if isinstance(record, dict) and isinstance(record.get("line"), int) and "error" not in record:
                return True
    return False


def check_same_settings(output: Path, settings: dict) -> None:
    """ConfigError when `output` holds answers made with other settings (or unknown ones)."""
    output = Path(output)
    if not has_answers(output):
        return
    path = settings_path(output)
    restart = "Pass --overwrite to discard them and start over, or choose another --output."
    try:
        recorded = json.loads(path.read_text())["settings"]
    except FileNotFoundError:
        raise ConfigError(
            f"{output} already holds answers, but not the record of how they were made ({path.name} is missing), so "
            f"they cannot be mixed with new ones. {restart}"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is unreadable ({type(e).__name__}). {restart}") from None
    differ = [key for key in sorted(set(settings) | set(recorded)) if settings.get(key) != recorded.get(key)]
    if differ:
        shown = "; ".join(
            f"{_label(k)}: {_short(recorded.get(k))} before, {_short(settings.get(k))} now" for k in differ
        )
        raise ConfigError(
            f"{output} holds answers made with other settings ({shown}), which would be mixed with new ones. {restart}"
        )


def write_settings(output: Path, settings: dict) -> None:
    """Record `settings` beside `output` (atomically: a crash leaves the old record or the new)."""
    path = settings_path(output)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps({"format": FORMAT, "settings": settings}, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _label(key: str) -> str:
    labels = {"model_sha256": "the model weights", "tokenizer_sha256": "the tokenizer", "ignore_eos": "--ignore-eos"}
    return labels.get(key, "--" + key.replace("_", "-"))


def _short(value) -> str:
    if isinstance(value, str) and len(value) == 64:  # a sha256
        return f"sha256 {value[:12]}..."
    return json.dumps(value)

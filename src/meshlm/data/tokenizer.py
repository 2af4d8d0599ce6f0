"""Byte-level BPE tokenizer (GPT-2 style) trained with Hugging Face `tokenizers`.

Byte-level means every string is encodable: the 256 byte symbols are in the
initial alphabet, so there is no unknown token and decode(encode(x)) == x for
any Unicode text. The only special token is `<|endoftext|>` with id 0; it
separates documents in the token files.

Always load through `load_tokenizer` (or the helpers here): it switches off the
matching of special tokens inside ordinary text, so a document that happens to
contain the string "<|endoftext|>" is encoded as text, not as a document break.
That setting is not stored in tokenizer.json.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from meshlm.config import ConfigError

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 0
# 256 byte symbols + the end-of-text token: the smallest useful vocabulary.
MIN_VOCAB_SIZE = 257


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: Path | str | None = None) -> Tokenizer:
    """Train a byte-level BPE with at most `vocab_size` tokens; save it to `path` if given.

    The result may have fewer tokens than `vocab_size` when the corpus has too few
    distinct pairs to merge; the model's embedding simply has unused rows then.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"'model.vocab_size' ({vocab_size}) is too small for a byte-level tokenizer: it needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + {EOT_TOKEN}). Raise model.vocab_size."
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],  # first special token gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(EOT_TOKEN) == EOT_ID
    tok.encode_special_tokens = True
    if path is not None:
        save_tokenizer(tok, path)
    return tok


def save_tokenizer(tok: Tokenizer, path: Path | str) -> None:
    """Write tokenizer.json atomically (temp file + rename), so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tok.save(str(tmp))
    os.replace(tmp, path)


def load_tokenizer(path: Path | str) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tokenizer file {path} not found. Run `meshlm data prepare` to train one.")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a plain Exception for a malformed file
        raise ConfigError(
            f"{path} is not a valid tokenizer.json ({e}). Delete it and run `meshlm data prepare` again."
        ) from None
    tok.encode_special_tokens = True
    return tok


# End-of-document tokens of meshlm's own tokenizers and of common Hugging Face ones (GPT-2,
# Llama 2 / Mistral, Llama 3), in order of preference.
SEPARATOR_TOKENS = (EOT_TOKEN, "</s>", "<|end_of_text|>", "<eos>")


def end_of_text_id(tok: Tokenizer) -> int | None:
    """The tokenizer's end-of-text token: meshlm's <|endoftext|> (id 0 in the tokenizers meshlm
    trains) or an imported Hugging Face tokenizer's; None when it has none (generation then stops
    at max tokens or a stop string only)."""
    for name in SEPARATOR_TOKENS:
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return token_id
    return None


def document_separator_id(tok: Tokenizer, source: str = "tokenizer") -> int:
    """The id placed between documents in the token files (data preparation needs one)."""
    token_id = end_of_text_id(tok)
    if token_id is not None:
        return token_id
    raise ConfigError(
        f"{source} has no end-of-text token (looked for {', '.join(SEPARATOR_TOKENS)}), so documents could not be "
        f"separated. Use a tokenizer that has one, or let meshlm train its own (leave data.tokenizer empty)."
    )


def load_or_train_tokenizer(path: Path | str, texts_factory: Callable[[], Iterable[str]], vocab_size: int) -> Tokenizer:
    """Reuse the tokenizer at `path` if present (it must fit in `vocab_size`), else train and save one.

    `texts_factory` is only called when training is needed, so callers can pass a
    lazy corpus reader.
    """
    path = Path(path)
    if path.exists():
        tok = load_tokenizer(path)
        if tok.get_vocab_size() > vocab_size:
            raise ConfigError(
                f"tokenizer {path} has {tok.get_vocab_size()} tokens but 'model.vocab_size' is {vocab_size}. "
                f"Raise model.vocab_size to at least {tok.get_vocab_size()}, or delete {path} to train a new one."
            )
        return tok
    return train_tokenizer(texts_factory(), vocab_size, path)


# Documents longer than this (in characters) are cut into pieces before they are encoded or
# counted for training: an Encoding keeps ~200 bytes per token, so a 50 MB single-line document
# encoded whole needs ~12 GB; in pieces, memory follows the piece size instead.
PIECE_CHARS = 1 << 18


def split_long_text(text: str, limit: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of at most `limit` characters, each cut placed just before a space
    that starts a word (where the byte-level pre-tokenizer splits anyway, so the pieces encode to
    the same tokens as the whole); failing that after a newline between two non-spaces (also a
    split point); failing both (half a piece without either) at `limit`, the one place where
    the tokens may differ from the whole's. Short texts come back whole."""
    if len(text) <= limit:
        return [text]
    pieces, start = [], 0
    while len(text) - start > limit:
        lo, hi = start + limit // 2, start + limit
        cut = text.rfind(" ", lo, hi)
        while cut > lo and text[cut + 1].isspace():
            cut = text.rfind(" ", lo, cut)
        if cut <= lo:  # no space starts a word here: after a newline between two non-spaces
            newline = text.rfind("\n", lo, hi)
            while newline > lo and (text[newline - 1].isspace() or text[newline + 1].isspace()):
                newline = text.rfind("\n", lo, newline)
            cut = newline + 1 if newline > lo else hi
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` (long texts encoded piece by piece: see split_long_text)."""
    ids: list[int] = []
    for piece in split_long_text(text):
        ids.extend(tok.encode(piece, add_special_tokens=False).ids)
    return ids


def decode(tok: Tokenizer, ids: Sequence[int]) -> str:
    # Keep special tokens so a decoded stream shows where documents end.
    return tok.decode(list(ids), skip_special_tokens=False)

"""The Python API's arguments: config overrides from dicts and keywords, `Layout`, `workers`.

Everything here turns what a notebook user writes into the `section.key=value` overrides of
`--set` (config.apply_overrides), so a bad key, a wrong type or an impossible value gets the
same message as on the command line, raised before any data is read or any process starts.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshlm.config import Config, ConfigError, model_section
from meshlm.utils.toml_writer import toml_value

# The config sections a plain keyword may belong to, in the order they are searched.
KEYWORD_SECTIONS = ("model", "data", "train", "parallel")


def toml_override(key: str, value: Any) -> str:
    """`key=value` with the value written as TOML, as `--set` reads it."""
    try:
        return f"{key}={toml_value(value)}"
    except TypeError:
        raise ConfigError(
            f"'{key}' got {value!r} ({type(value).__name__}); pass a number, a string, true/false or a list."
        ) from None


def _section_keys(family: str) -> dict[str, list[str]]:
    """Section name -> its keys, with [model] the keys of `family`."""
    defaults = Config()
    keys = {s: [f.name for f in dataclasses.fields(getattr(defaults, s))] for s in KEYWORD_SECTIONS}
    keys["model"] = [f.name for f in dataclasses.fields(model_section(family))]
    return keys


def overrides_from(
    overrides: Mapping[str, Any] | list[str] | None, keywords: Mapping[str, Any], family: str = "transformer"
) -> list[str]:
    """`--set` strings from a dict of dotted keys (or a list of `key=value` strings) and plain
    keywords (`d_model=256`: the one section that has the key; [model] is that of the family the
    overrides choose, else `family`, the config file's). model.family goes first, since it
    decides which keys [model] has."""
    if overrides is None:
        overrides = {}
    if isinstance(overrides, (list, tuple)):
        items = [str(o) for o in overrides]
    elif isinstance(overrides, Mapping):
        for key in overrides:
            if not isinstance(key, str) or "." not in key:
                raise ConfigError(
                    f"overrides: the key {key!r} must be a dotted config key such as 'train.lr' or 'model.d_model'; "
                    f"plain names go as keyword arguments (LanguageModel(..., lr=1e-3))."
                )
        items = [toml_override(k, v) for k, v in overrides.items()]
    else:
        raise ConfigError(
            f"overrides must be a dict of dotted keys ({{'train.lr': 1e-3}}) or a list of 'key=value' strings, "
            f"got {type(overrides).__name__}."
        )
    chosen = next((i.split("=", 1)[1].strip().strip('"') for i in items if i.startswith("model.family=")), None)
    family = keywords.get("family", chosen) or family
    items += [toml_override(resolve_keyword(name, str(family)), value) for name, value in keywords.items()]
    return sorted(items, key=lambda item: not item.startswith("model.family="))


def resolve_keyword(name: str, family: str) -> str:
    """The dotted key a plain keyword names, or ConfigError when no section or several have it."""
    sections = _section_keys(family)
    owners = [s for s, keys in sections.items() if name in keys]
    if len(owners) == 1:
        return f"{owners[0]}.{name}"
    if owners:
        raise ConfigError(
            f"the keyword '{name}' is ambiguous: sections {', '.join(owners)} all have it. Pass it as a dotted key, "
            f"e.g. overrides={{'{owners[0]}.{name}': ...}}."
        )
    every = [f"{s}.{k}" for s, keys in sections.items() for k in keys]
    close = difflib.get_close_matches(name, [k.split(".", 1)[1] for k in every], n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise ConfigError(
        f"unknown keyword argument '{name}'{hint}: it is no key of [model] (family '{family}'), [data], [train] or "
        f"[parallel]. `meshlm config show` lists every key."
    )


@dataclass(frozen=True)
class Layout:
    """A parallel layout for `fit(..., parallel=Layout(dp=2, tp=2))`: the [parallel] keys.

    dp="auto" takes what remains of the workers after tp x pp. zero is the ZeRO stage
    (0 DDP, 1, 2, 3 = FSDP). Any other [parallel] key goes in `extra` (e.g.
    {"pp_schedule": "gpipe"})."""

    dp: int | str = "auto"
    tp: int = 1
    pp: int = 1
    zero: int = 0
    sequence_parallel: bool = False
    extra: Mapping[str, Any] | None = None

    def overrides(self) -> list[str]:
        keys = {"dp": self.dp, "tp": self.tp, "pp": self.pp, "zero": self.zero}
        keys["sequence_parallel"] = self.sequence_parallel
        keys.update(dict(self.extra or {}))
        return [toml_override(f"parallel.{k}", v) for k, v in keys.items()]


def parallel_overrides(parallel: Any) -> tuple[list[str], bool]:
    """(overrides, auto) for fit's `parallel=` argument: None (the config's), "auto", a Layout
    or a dict of [parallel] keys."""
    if parallel is None:
        return [], False
    if isinstance(parallel, str):
        if parallel != "auto":
            raise ConfigError(f'parallel= must be "auto", a meshlm.Layout(...) or a dict, got {parallel!r}.')
        return [], True
    if isinstance(parallel, Layout):
        return parallel.overrides(), False
    if isinstance(parallel, Mapping):
        return Layout(extra=dict(parallel)).overrides(), False
    raise ConfigError(
        f'parallel= must be "auto", a meshlm.Layout(dp=..., tp=..., pp=...) or a dict of [parallel] keys, '
        f"got {type(parallel).__name__}."
    )


def check_workers(workers: Any) -> int:
    """`workers=` as a positive int, or ConfigError naming it."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(
            f"workers= must be a positive integer (the number of worker processes; 1 runs in this process), "
            f"got {workers!r}."
        )
    return workers

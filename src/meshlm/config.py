"""Typed configuration: nested dataclasses, TOML files and `--set` overrides.

Every key is declared here once, with its type and default. Loading a TOML file
or applying `--set section.key=value` checks each key against these
declarations, so a typo, a wrong type or an impossible value fails before any
data is read or any process is started, with a message that names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

from meshlm.utils.errors import ConfigError
from meshlm.utils.toml_writer import dump_toml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG_NAME = "tiny-cpu"


# Pipeline schedules (torch.distributed.pipelining's): one stage per rank, several looped stages
# per rank, or zbv's two stages per rank in a V. The one list every layer reads.
PipelineSchedule = Literal["gpipe", "1f1b", "interleaved-1f1b", "interleaved-zero-bubble", "zbv"]
PIPELINE_SCHEDULES: tuple[str, ...] = typing.get_args(PipelineSchedule)
LOOPED_SCHEDULES = ("interleaved-1f1b", "interleaved-zero-bubble")
MULTI_STAGE_SCHEDULES = (*LOOPED_SCHEDULES, "zbv")


def schedule_stages_per_rank(schedule: str, virtual_stages: int) -> int:
    """Pipeline stages each pipeline rank holds under `schedule`."""
    if schedule == "zbv":
        return 2
    return virtual_stages if schedule in LOOPED_SCHEDULES else 1


DEFAULT_FAMILY = "transformer"


@dataclass
class ModelConfig:
    """The [model] section: which family (`model.family`), and the keys every family has.
    Each family extends this with its own keys (its dataclass is registered under its name by
    meshlm.model.registry); `[model]` in a TOML file or `--set model.KEY=...` reads the keys of
    the family chosen with `model.family` ("transformer" when not given)."""

    family: str = DEFAULT_FAMILY
    vocab_size: int = 2048
    # The longest sequence the model is built for (positions, caches).
    max_seq_len: int = 1024

    # A family whose model can also read the tokens after each position (a tagger's backbone
    # option) names the boolean [model] key and the value that switches this on, e.g.
    # ("causal", False). Such a model is no language model: it cannot generate or be scored
    # left to right, and pretraining it would be trivial (each position sees its target).
    RIGHT_CONTEXT: ClassVar[tuple[str, bool] | None] = None
    # The learning rate `meshlm finetune` starts from on a backbone of this family (its floor,
    # train.min_lr, a tenth of it), before --set: families differ by 10x in what fine-tunes well.
    FINETUNE_LR: ClassVar[float] = 1e-3

    def validate(self) -> None:
        """Family-specific checks, each raising ConfigError that names the key and the fix."""
        _check_positive({"model.vocab_size": self.vocab_size, "model.max_seq_len": self.max_seq_len})

    def right_context_setting(self) -> str | None:
        """'model.KEY = VALUE' when this model's positions see the tokens after them, else None."""
        if self.RIGHT_CONTEXT is None:
            return None
        key, value = self.RIGHT_CONTEXT
        return f"model.{key} = {str(value).lower()}" if getattr(self, key) == value else None

    def right_context_override(self) -> str | None:
        """The `--set` override that gives this family's model right context ("model.causal=false"),
        or None for a family that has no such option."""
        if self.RIGHT_CONTEXT is None:
            return None
        key, value = self.RIGHT_CONTEXT
        return f"model.{key}={str(value).lower()}"


def check_left_to_right(m: ModelConfig, use: str) -> None:
    """ConfigError when `m` sees right context (ModelConfig.RIGHT_CONTEXT) and `use` (a language
    model's training or inference, named in the message) needs a left-to-right model."""
    setting = m.right_context_setting()
    if setting is None:
        return
    key, value = m.RIGHT_CONTEXT
    raise ConfigError(
        f"{use} needs a left-to-right language model, but {setting} lets every position see the tokens after "
        f"it (a backbone option for taggers): it is no next-token predictor (training it so would be trivial, "
        f"each position seeing its target; generating would need the tokens not written yet). Set "
        f"model.{key}={str(not value).lower()} (the default) for a language model; use {setting} only when "
        f"fine-tuning a task model (meshlm finetune --task ner|srl|classify ... --set {m.right_context_override()})."
    )


# family name -> its [model] dataclass, filled by meshlm.model.registry (a lower layer cannot
# import the families, so they register themselves).
MODEL_SECTIONS: dict[str, type[ModelConfig]] = {}


def register_model_section(family: str, section: type[ModelConfig]) -> None:
    if not (isinstance(section, type) and issubclass(section, ModelConfig)):
        raise TypeError(f"the [model] section of family '{family}' must subclass meshlm.config.ModelConfig")
    MODEL_SECTIONS[family] = section


def model_section(family: str, source: str = "config") -> type[ModelConfig]:
    """The [model] dataclass of a family, or ConfigError naming the families there are."""
    if family not in MODEL_SECTIONS:
        known = ", ".join(sorted(MODEL_SECTIONS)) or "none registered"
        raise ConfigError(
            f"{source}: unknown model.family '{family}'{_did_you_mean(family, list(MODEL_SECTIONS))}. Families: {known}."
        )
    return MODEL_SECTIONS[family]


def _default_model() -> ModelConfig:
    return model_section(DEFAULT_FAMILY)()


@dataclass
class DataConfig:
    # "python-stdlib" (its English alone: "python-stdlib-prose"), a directory or glob of text
    # files, a .jsonl file (field "text") or a .parquet file (column "text").
    source: str = "python-stdlib"
    # Where prepared token files live; empty means a folder under
    # `cache_dir` named after the source and the vocabulary size.
    dir: str = ""
    cache_dir: str = ".meshlm-cache"
    seq_len: int = 128
    # Fraction of documents held out for validation (split by document).
    val_fraction: float = 0.05
    # Documents whose text is larger than this are skipped (0 = no limit).
    max_doc_bytes: int = 0
    # Cap on the corpus size in bytes read from the source (0 = no limit).
    max_bytes: int = 0
    # An existing tokenizer.json to use instead of training one (e.g. a Hugging Face model's).
    tokenizer: str = ""
    # How text files of a directory or glob source are decoded; files that do not decode are
    # skipped and reported (.jsonl and .parquet are always UTF-8).
    encoding: str = "utf-8"


@dataclass
class TrainConfig:
    steps: int = 200
    # How the parameters are fitted. "adamw" and "sgd" take gradient steps on sampled batches.
    # "lbfgs" runs full-batch L-BFGS over the whole training split (one step = one L-BFGS
    # iteration; for convex models such as maxent). "em" runs expectation-maximisation, for
    # families that have it (hmm): one step = one full Baum-Welch pass over the training split.
    # lbfgs and em cut the split into consecutive data.seq_len windows, micro_batch at a time.
    optimizer: Literal["adamw", "sgd", "lbfgs", "em"] = "adamw"
    # L-BFGS: correction pairs kept, and the L2 penalty lbfgs_l2 / 2 * |W|^2 on the weight
    # matrices (dim >= 2) added to the mean loss.
    lbfgs_history: int = 20
    lbfgs_l2: float = 0.0
    # EM: add-k smoothing of the expected counts in the M-step (0 = maximum likelihood).
    em_smoothing: float = 0.0
    micro_batch: int = 8
    # Sequences per optimizer step over all data-parallel ranks;
    # 0 means micro_batch x data-parallel degree (no accumulation).
    global_batch: int = 0
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1337
    # Start from a local Hugging Face model directory: its architecture replaces [model],
    # its weights the initialisation, its tokenizer.json the trained one.
    init_from_hf: str = ""
    dtype: Literal["float32", "bfloat16"] = "float32"
    activation_checkpointing: bool = False
    compile: bool = False
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 1
    progress: bool = True
    sample_prompt: str = "def "
    sample_tokens: int = 64
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    async_checkpoint: bool = False
    # Steps whose loss or gradient norm is NaN or infinite: their update is skipped (the weights
    # are never changed by one) and counted; one more than this many stops training (0: the
    # first stops it), with a message naming the step and the last good checkpoint.
    skip_nonfinite_steps: int = 0
    profile_comm: bool = False
    trace: bool = False
    # Seconds a collective may wait for its peers before the run stops with an error naming the
    # node that does not answer (a network partition, a hung node); raise it where one rank may
    # legitimately keep the others waiting that long.
    collective_timeout_s: float = 600.0

    def global_batch_for(self, dp: int) -> int:
        """Sequences per optimizer step over all ranks: global_batch, or micro_batch x dp when 0."""
        return self.global_batch or self.micro_batch * dp


@dataclass
class ParallelConfig:
    # Let the planner choose every key below for the world size at hand (`parallel = "auto"`
    # in a TOML file, or --set parallel.auto=true); the choice and the runner-up are logged.
    auto: bool = False
    # With auto: time the planner's K best-predicted layouts for a few real steps on this machine
    # (each through `meshlm train --nproc`) and train with the one measured fastest; 0 = trust the model.
    auto_measure: int = 0
    # "auto" = world size / (tp x pp).
    dp: int | Literal["auto"] = "auto"
    # 0 = DDP, 1 = optimizer state sharded, 2 = + gradients, 3 = + parameters (FSDP).
    zero: int = 0
    # HSDP: number of replica groups, each fully sharding over dp / dp_replicate ranks.
    dp_replicate: int = 1
    tp: int = 1
    sequence_parallel: bool = False
    pp: int = 1
    pp_schedule: PipelineSchedule = "1f1b"
    # 0 = pp (or pp x virtual stages for interleaved schedules).
    pp_microbatches: int = 0
    pp_virtual_stages: int = 1
    # "auto" balances layers over stages by the family's cost model; "measured" times each block
    # (forward + backward on the device) before training and balances those times; or an
    # explicit list of layer counts.
    pp_split: Literal["auto", "measured"] | list[int] = "auto"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=_default_model)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())

    def fingerprint(self) -> str:
        """A short hash of the settings that define *what* is trained."""
        relevant = {k: v for k, v in self.to_dict().items() if k in ("model", "data")}
        relevant["train"] = {k: self.train.__dict__[k] for k in ("seed", "lr", "steps", "global_batch", "micro_batch")}
        return hashlib.sha256(dump_toml(relevant).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- loading


def resolve_config_path(name: str | None) -> Path:
    """A path to a TOML file, or the name of a built-in config such as `tiny-cpu`."""
    if not name:
        name = DEFAULT_CONFIG_NAME
    path = Path(name)
    if path.is_file():
        return path
    builtin = CONFIG_DIR / (name if name.endswith(".toml") else f"{name}.toml")
    if builtin.is_file():
        return builtin
    available = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.toml")))
    raise ConfigError(
        f"config file '{name}' not found. Pass a path to a TOML file or one of the built-in configs: {available}."
    )


def load_config(name: str | None = None, overrides: list[str] | tuple[str, ...] = (), validated: bool = True) -> Config:
    """Load a config file (or built-in name), apply `section.key=value` overrides, validate.
    `validated=False` leaves validation to the caller, for callers that complete the config
    first (`train.init_from_hf` replaces [model] by a Hugging Face model's: see
    meshlm.interop.init_from_hf.load_training_config)."""
    path = resolve_config_path(name)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}. Fix the syntax at the position given.") from e
    cfg = config_from_dict(raw, source=str(path))
    apply_overrides(cfg, overrides)
    if validated:
        validate(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any], source: str = "config", config_type: type[Config] | None = None) -> Config:
    """A Config (or a subclass with more sections, `config_type`: a task run's [task]) from a
    parsed TOML dict, every key checked."""
    cfg = (config_type or Config)()
    for section, values in raw.items():
        sub = _section(cfg, section, source)
        if section == "parallel" and values == "auto":
            cfg.parallel.auto = True
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: '{section}' must be a table ([{section}]), got {type(values).__name__}.")
        if section == "model" and "family" in values:  # the family decides which keys [model] has
            _switch_family(cfg, values["family"], source)
            sub = cfg.model
        for key, value in values.items():
            if not (section == "model" and key == "family"):
                _set_field(sub, section, key, value, source)
    return cfg


def _switch_family(cfg: Config, family: Any, source: str) -> None:
    """Make cfg.model the [model] section of `family`. Keys both families have keep a value
    that was set before the switch (`--set model.d_model=256 --set model.family=gcnn`)."""
    if not isinstance(family, str):
        raise ConfigError(f"{source}: 'model.family' expects a string, got {family!r}.")
    new_type = model_section(family, source)
    old = cfg.model
    if type(old) is new_type:
        return
    new, old_defaults = new_type(), type(old)()
    for f in dataclasses.fields(new):
        if f.name != "family" and hasattr(old, f.name) and getattr(old, f.name) != getattr(old_defaults, f.name):
            setattr(new, f.name, getattr(old, f.name))
    new.family = family
    cfg.model = new


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> None:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.steps=100.")
        dotted, text = item.split("=", 1)
        if "." not in dotted:
            raise ConfigError(
                f"override '{item}' must name a section and a key, e.g. train.{dotted.strip()}=... "
                f"(sections: {', '.join(f.name for f in dataclasses.fields(Config))})."
            )
        section, key = dotted.strip().split(".", 1)
        sub = _section(cfg, section, "--set")
        if section == "model" and key == "family":
            _switch_family(cfg, _parse_value(text.strip()), "--set")
            continue
        _set_field(sub, section, key, _parse_value(text.strip()), "--set")


def _parse_value(text: str) -> Any:
    """Parse an override value as TOML (numbers, booleans, lists, quoted strings); else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _section(cfg: Config, section: str, source: str) -> Any:
    names = [f.name for f in dataclasses.fields(cfg)]
    if section not in names:
        raise ConfigError(
            f"{source}: unknown config section '{section}'{_did_you_mean(section, names)}. Sections: {', '.join(names)}."
        )
    return getattr(cfg, section)


def _set_field(obj: Any, section: str, key: str, value: Any, source: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if key not in fields:
        where = f"[{section}]" + (f" for model.family '{obj.family}'" if isinstance(obj, ModelConfig) else "")
        raise ConfigError(
            f"{source}: unknown key '{section}.{key}'{_did_you_mean(key, list(fields), prefix=section + '.')}. "
            f"Valid keys in {where}: {', '.join(fields)}."
        )
    hint = typing.get_type_hints(type(obj))[key]
    try:
        coerced = _coerce(value, hint)
    except TypeError:
        raise ConfigError(
            f"{source}: '{section}.{key}' expects {_describe(hint)}, got {value!r} ({type(value).__name__})."
        ) from None
    setattr(obj, key, coerced)


def _coerce(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(value, option)
            except TypeError:
                continue
        raise TypeError
    if origin is Literal:
        if value in typing.get_args(hint):
            return value
        raise TypeError
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise TypeError
        return [_coerce(v, item_type) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise TypeError
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _did_you_mean(word: str, options: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


# ----------------------------------------------------------------------------- validation


def _check_finite_floats(obj: Any, section: str) -> None:
    """NaN and infinity parse as TOML floats (nan, inf) but are never a usable setting."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(
                f"'{section}.{f.name}' is {value}, which is not a finite number; give it a real value "
                f"(the default is {f.default})."
            )


def validate(cfg: Config) -> None:
    """Impossible values, each with the key and the fix. Layout checks against the world
    size live with ParallelDims, which knows the world size."""
    m, d, t, p = cfg.model, cfg.data, cfg.train, cfg.parallel
    for name, section in (("model", m), ("data", d), ("train", t), ("parallel", p)):
        _check_finite_floats(section, name)
    m.validate()
    positive = {
        "data.seq_len": d.seq_len,
        "train.steps": t.steps,
        "train.micro_batch": t.micro_batch,
        "train.eval_batches": t.eval_batches,
        "train.log_every": t.log_every,
        "parallel.tp": p.tp,
        "parallel.pp": p.pp,
        "parallel.dp_replicate": p.dp_replicate,
        "parallel.pp_virtual_stages": p.pp_virtual_stages,
    }
    _check_positive(positive)
    non_negative = {
        "train.global_batch": t.global_batch,
        "train.warmup_steps": t.warmup_steps,
        "train.eval_every": t.eval_every,
        "train.checkpoint_every": t.checkpoint_every,
        "train.sample_tokens": t.sample_tokens,
        "data.max_bytes": d.max_bytes,
        "data.max_doc_bytes": d.max_doc_bytes,
        "parallel.pp_microbatches": p.pp_microbatches,
        "train.keep_checkpoints": t.keep_checkpoints,
        "train.skip_nonfinite_steps": t.skip_nonfinite_steps,
    }
    _check_non_negative(non_negative)
    if d.seq_len > m.max_seq_len:
        raise ConfigError(
            f"'data.seq_len' ({d.seq_len}) exceeds 'model.max_seq_len' ({m.max_seq_len}); raise model.max_seq_len or shorten data.seq_len."
        )
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"'data.val_fraction' must be between 0 and 1 (exclusive), got {d.val_fraction}.")
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        raise ConfigError(f"need 0 <= 'train.min_lr' ({t.min_lr}) <= 'train.lr' ({t.lr}) and train.lr > 0.")
    if t.collective_timeout_s <= 0:
        raise ConfigError(
            f"'train.collective_timeout_s' must be a positive number of seconds, got {t.collective_timeout_s}; "
            f"it bounds how long a collective waits for an unreachable peer (default 600)."
        )
    if t.grad_clip < 0 or t.weight_decay < 0:
        raise ConfigError("'train.grad_clip' and 'train.weight_decay' must be zero or positive.")
    if not (0 <= t.beta1 < 1 and 0 <= t.beta2 < 1):
        raise ConfigError(f"'train.beta1' ({t.beta1}) and 'train.beta2' ({t.beta2}) must be in [0, 1).")
    if t.global_batch and t.global_batch % t.micro_batch:
        raise ConfigError(
            f"'train.global_batch' ({t.global_batch}) must be a multiple of 'train.micro_batch' ({t.micro_batch}) "
            f"times the data-parallel degree (global_batch = micro_batch x accumulation x dp)."
        )
    if p.zero not in (0, 1, 2, 3):
        raise ConfigError(f"'parallel.zero' must be 0, 1, 2 or 3, got {p.zero}.")
    if p.auto_measure < 0:
        raise ConfigError(
            f"'parallel.auto_measure' is how many of the best-predicted layouts to time before training "
            f"(0 = none); it cannot be negative, got {p.auto_measure}."
        )
    _validate_optimizer(t, p)
    if isinstance(p.dp, int) and p.dp <= 0:
        raise ConfigError(f"'parallel.dp' must be a positive integer or \"auto\", got {p.dp}.")
    if isinstance(p.pp_split, list) and any(n <= 0 for n in p.pp_split):
        raise ConfigError(f"'parallel.pp_split' entries must be positive layer counts, got {p.pp_split}.")


def _validate_optimizer(t: TrainConfig, p: ParallelConfig) -> None:
    """The fitting methods that are not per-batch gradient steps run on data parallelism only."""
    if t.lbfgs_history <= 0:
        raise ConfigError(f"'train.lbfgs_history' must be a positive integer, got {t.lbfgs_history}.")
    if t.lbfgs_l2 < 0 or t.em_smoothing < 0:
        raise ConfigError(
            f"'train.lbfgs_l2' ({t.lbfgs_l2}) and 'train.em_smoothing' ({t.em_smoothing}) must be zero or positive."
        )
    if t.optimizer == "sgd" and p.zero in (1, 2):
        raise ConfigError(
            f'parallel.zero={p.zero} shards AdamW\'s moments, which train.optimizer="sgd" does not have; '
            f'use parallel.zero=0 or 3 with sgd, or train.optimizer="adamw".'
        )
    if t.optimizer in ("lbfgs", "em") and (p.zero != 0 or p.tp != 1 or p.pp != 1 or p.dp_replicate != 1):
        what = "full-batch L-BFGS" if t.optimizer == "lbfgs" else "EM"
        raise ConfigError(
            f'train.optimizer="{t.optimizer}" ({what}) keeps the whole model on every rank and sums its statistics '
            f"over data-parallel ranks only: it needs parallel.zero=0, tp=1, pp=1 and dp_replicate=1 (got zero={p.zero}, "
            f'tp={p.tp}, pp={p.pp}, dp_replicate={p.dp_replicate}). Change the [parallel] keys or use train.optimizer="adamw".'
        )


def _check_positive(values: dict[str, int]) -> None:
    for key, value in values.items():
        if value <= 0:
            raise ConfigError(f"'{key}' must be a positive integer, got {value}.")


def _check_non_negative(values: dict[str, int]) -> None:
    for key, value in values.items():
        if value < 0:
            raise ConfigError(f"'{key}' must be zero or positive, got {value}.")


check_positive, check_non_negative = _check_positive, _check_non_negative  # for the families' validate()

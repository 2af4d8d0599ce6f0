"""`meshlm.LanguageModel`: fit / predict / evaluate / save in a few lines, on 1 or N processes.

    lm = meshlm.LanguageModel("tiny-cpu", d_model=64, lr=1e-3)
    history = lm.fit("python-stdlib", steps=100, workers=2)    # dp2; parallel=meshlm.Layout(tp=2)
    lm.predict(["def add(a, b):"], max_new_tokens=20)          # -> list of completions
    lm.evaluate(["x = 1\n"])                                    # -> {"loss": ..., "perplexity": ...}

`fit` is `meshlm train`: the same config loading and validation (a keyword is a `--set`), the
same trainer, and with workers=N the launcher of `meshlm train --nproc N`; it leaves a normal
run directory behind. predict / evaluate are `meshlm predict` / `meshlm eval` on that run.
Since every layout computes what one process computes, the result does not depend on workers.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from meshlm.api.commands import read_jsonl, run_command, texts_file, unique_run_dir, write_jsonl
from meshlm.api.history import History, MetricsWatcher, read_records
from meshlm.api.options import check_workers, overrides_from, parallel_overrides, toml_override
from meshlm.api.workers import run_workers
from meshlm.artifacts.run_dir import check_run_dir, load_run_config
from meshlm.config import DEFAULT_CONFIG_NAME, ConfigError, load_config
from meshlm.data.prepare import prepare_data
from meshlm.distributed.dims import parallel_dims_from_config
from meshlm.interop.init_from_hf import load_training_config

# What save() copies: the files that make a run directory usable by predict / eval / finetune.
SAVED_FILES = ("config.toml", "tokenizer.json", "model.safetensors", "metrics.jsonl", "loss.png")


def _quiet(*args, **kwargs) -> None:
    pass


class LanguageModel:
    """A language model of any registered family, configured like `meshlm train`.

    config: a built-in config name ("tiny-cpu", "maxent-tiny", ...) or a TOML file.
    overrides: dotted keys, {"model.d_model": 256, "train.lr": 1e-3} (or "key=value" strings).
    keywords: plain key names where one section has them (d_model=256, lr=1e-3, steps=50).
    Every key is checked here, with the messages of `--set`."""

    def __init__(self, config: str | Path | None = None, overrides: Mapping[str, Any] | None = None, **keywords: Any):
        self.config_name = str(config) if config else DEFAULT_CONFIG_NAME
        family = load_config(self.config_name, validated=False).model.family  # the file's: which keys [model] has
        self.overrides = overrides_from(overrides, keywords, family)
        self.config = load_training_config(self.config_name, self.overrides)
        self.run_dir: Path | None = None

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_hf(cls, hf_dir: str | Path, config: str | Path | None = None, **keywords: Any) -> LanguageModel:
        """A local Hugging Face model directory (Llama, Mistral, GPT-2; nothing is downloaded):
        ready to predict / evaluate, and `fit` fine-tunes from its weights."""
        from meshlm.tasks.backbone import converted_hf_run

        hf_dir = Path(hf_dir).resolve()
        overrides = dict(keywords.pop("overrides", None) or {})
        overrides["train.init_from_hf"] = str(hf_dir)
        lm = cls(config, overrides=overrides, **keywords)
        lm.run_dir = converted_hf_run(hf_dir, Path(lm.config.data.cache_dir))
        return lm

    @classmethod
    def _from_run(cls, run_dir: Path) -> LanguageModel:
        run_dir = Path(run_dir)
        lm = cls.__new__(cls)
        lm.config_name, lm.overrides = str(run_dir / "config.toml"), []
        lm.config = load_run_config(run_dir)
        lm.run_dir = run_dir
        return lm

    def __repr__(self) -> str:
        where = f", run_dir='{self.run_dir}'" if self.run_dir else " (not fitted)"
        return f"LanguageModel('{self.config_name}', family='{self.config.model.family}'{where})"

    # ------------------------------------------------------------------ training

    def fit(
        self,
        data: str | Path | Sequence[str] = "python-stdlib",
        steps: int | None = None,
        workers: int = 1,
        parallel: Any = None,
        validation_split: float | None = None,
        validation_data: Sequence[str] | str | None = None,
        callbacks: Sequence[Any] = (),
        run_dir: str | Path | None = None,
        overwrite: bool = False,
        verbose: bool = True,
    ) -> History:
        """Train, as `meshlm train` does, and return the History (loss per step, validation
        metrics per evaluation).

        data: a list of texts, a path (directory, glob, .txt/.jsonl/.parquet) or "python-stdlib".
        workers: processes (1 = this process); parallel: "auto" (the planner picks), a
        meshlm.Layout(dp=..., tp=..., pp=..., zero=...) or None (the config's [parallel]).
        validation_split: the held-out fraction of the documents (data.val_fraction), evaluated
        every train.eval_every steps; validation_data: texts (or a corpus path) scored once more
        after the last step, recorded as the last "val_loss".
        callbacks: meshlm.Callback objects or functions f(step, logs).
        run_dir: where the run is written (default: a new directory under runs/)."""
        workers = check_workers(workers)
        layout, auto = parallel_overrides(parallel)
        extra = [*layout, "train.progress=false"]
        if steps is not None:
            extra.append(toml_override("train.steps", steps))
        if validation_split is not None:
            extra.append(toml_override("data.val_fraction", validation_split))
        out = Path(run_dir) if run_dir else unique_run_dir(Path(self.config_name).stem)
        if isinstance(data, (str, Path)):
            extra.append(toml_override("data.source", str(data)))
        elif isinstance(data, Sequence):
            folder = Path(self.config.data.cache_dir) / "api-texts"
            extra.append(toml_override("data.source", str(texts_file(list(data), folder))))
        else:
            raise ConfigError(f"fit(data=...) takes a list of texts or a path, got {type(data).__name__}.")
        cfg = load_training_config(self.config_name, self.overrides + extra)
        log = print if verbose else _quiet
        if auto:
            from meshlm.plan.auto import resolve_auto_layout

            resolve_auto_layout(cfg, workers, log=log)
        parallel_dims_from_config(cfg, workers)  # a layout that cannot run on `workers` fails here
        check_run_dir(out, cfg, overwrite)
        prepare_data(cfg.data, cfg.model.vocab_size, log=log)  # once, here; the workers find it
        with MetricsWatcher(out / "metrics.jsonl", cfg.train.steps, callbacks, progress=verbose) as watcher:
            if workers == 1:
                self._train_here(cfg, out, overwrite, log)
            else:
                self._train_on_workers(cfg, out, overwrite, workers)
        records = read_records(out / "metrics.jsonl")
        self.config, self.run_dir = cfg, out
        if validation_data is not None:
            scores = self.evaluate(validation_data)
            records.append({"step": cfg.train.steps, "val_loss": scores["loss"], "val_ppl": scores["perplexity"]})
        history = History(records, out)
        if watcher.error is not None:
            raise watcher.error
        for cb in watcher.callbacks:
            cb.on_train_end(history)
        return history

    @staticmethod
    def _train_here(cfg, out: Path, overwrite: bool, log) -> None:
        from meshlm.inference.simple_generate import end_of_run_sample
        from meshlm.train.trainer import train

        train(cfg, out, overwrite=overwrite, log=log, sampler=end_of_run_sample)

    @staticmethod
    def _train_on_workers(cfg, out: Path, overwrite: bool, workers: int) -> None:
        """`meshlm train --config <the resolved config> --out OUT` on `workers` processes."""
        with tempfile.TemporaryDirectory(prefix="meshlm-fit-") as tmp:
            config_file = Path(tmp) / "config.toml"
            config_file.write_text(cfg.to_toml())
            argv = ["train", "--config", str(config_file), "--out", str(out.resolve())]
            run_workers(workers, argv + (["--overwrite"] if overwrite else []))

    # ------------------------------------------------------------------ inference

    def _require_run(self) -> Path:
        if self.run_dir is None or not (Path(self.run_dir) / "model.safetensors").is_file():
            raise ConfigError(
                "this LanguageModel has no trained weights yet: call fit(...) first, or load a run with "
                "meshlm.load('runs/NAME') or LanguageModel.from_hf('HF_DIR')."
            )
        return Path(self.run_dir).resolve()

    def predict(
        self,
        prompts: Sequence[str],
        workers: int = 1,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        tp: int = 1,
        max_batch: int = 16,
        ignore_eos: bool = False,
        progress: bool = False,
        quantize: str = "none",
    ) -> list[str]:
        """Completions of `prompts`, in input order (`meshlm predict`; greedy by default).
        workers=N splits the prompts over N / tp data-parallel groups of tp ranks; with a seed
        each prompt's sampling seed depends on its position only, so the output does not
        depend on workers. quantize="int8": decode with int8 linear layers (docs/performance.md)."""
        if isinstance(prompts, str):
            raise ConfigError("predict() takes a list of prompts; for one prompt use generate(prompt).")
        workers = check_workers(workers)
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1 or workers % tp:
            raise ConfigError(f"tp= ({tp!r}) must be a positive integer that divides workers= ({workers}).")
        run = self._require_run()
        if not prompts:
            return []
        with tempfile.TemporaryDirectory(prefix="meshlm-predict-") as tmp:
            inp = write_jsonl(Path(tmp) / "prompts.jsonl", ({"prompt": str(p)} for p in prompts))
            outp = Path(tmp) / "completions.jsonl"
            argv = ["predict", "--run", run, "--input", inp, "--output", outp, "--tp", tp, "--max-batch", max_batch]
            argv += ["--max-new-tokens", max_new_tokens, "--temperature", temperature, "--top-k", top_k]
            argv += ["--top-p", top_p, "--repetition-penalty", repetition_penalty]
            argv += (["--seed", seed] if seed is not None else []) + [a for s in stop for a in ("--stop", s)]
            argv += (["--ignore-eos"] if ignore_eos else []) + ([] if progress else ["--no-progress"])
            argv += ["--quantize", quantize]
            run_command(argv, workers, quiet=not progress)
            records = read_jsonl(outp)
        errors = [r["error"] for r in records if "error" in r]
        if errors:
            raise ConfigError(f"predict: {len(errors)} prompt(s) could not be run; the first: {errors[0]}")
        return [r["text"] for r in sorted(records, key=lambda r: r["line"])]

    def generate(self, prompt: str, **options: Any) -> str:
        """One completion (the options of predict)."""
        return self.predict([prompt], **options)[0]

    def evaluate(
        self,
        data: Sequence[str] | str | Path,
        workers: int = 1,
        seq_len: int | None = None,
        batch_size: int = 8,
        quantize: str = "none",
    ) -> dict[str, float]:
        """Loss (nats per token) and perplexity on texts or a corpus path (`meshlm eval`):
        {"loss", "perplexity", "tokens", "windows", "seq_len"}; quantize="int8" with int8 linear layers."""
        workers = check_workers(workers)
        run = self._require_run()
        with tempfile.TemporaryDirectory(prefix="meshlm-eval-") as tmp:
            source = str(data) if isinstance(data, (str, Path)) else str(texts_file(list(data), Path(tmp)))
            result = Path(tmp) / "result.json"
            argv = ["eval", "--run", run, "--data", source, "--batch-size", batch_size, "--output", result]
            argv += ["--quantize", quantize]
            run_command(argv + (["--seq-len", seq_len] if seq_len else []), workers)
            return read_jsonl(result)[0]

    # ------------------------------------------------------------------ files

    def save(self, directory: str | Path) -> Path:
        """Copy the run's files (config, tokenizer, weights, metrics) to `directory`; meshlm.load
        and every command (`meshlm predict --run DIR`, `serve`, `finetune --from`) read it."""
        run = self._require_run()
        out = Path(directory)
        if out.resolve() == run:
            return out
        out.mkdir(parents=True, exist_ok=True)
        for name in SAVED_FILES:
            with contextlib.suppress(FileNotFoundError):
                shutil.copyfile(run / name, out / name)
        return out

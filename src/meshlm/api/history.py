"""What `fit` returns (History) and how it reports while it runs (progress bar, callbacks).

Training writes one JSON line per step (and per evaluation) to the run's metrics.jsonl,
whether it runs in this process or on N workers. A watcher thread follows that file: it moves
a progress bar (tqdm.auto: a widget in Jupyter, text in a terminal) and calls the callbacks
with each record. The History is read from the finished file, so it holds exactly what the
run directory holds.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# Per-step keys kept in History.history (the evaluation records add val_* keys).
STEP_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s", "step_time_s")


class Callback:
    """Base class of fit's callbacks (Keras-style); override what you need. They run on a
    watcher thread of the calling process while training runs (in-process or on workers):
    `on_step_end(step, logs)` per training step, `on_eval_end(step, logs)` per validation,
    `on_train_end(history)` once in the caller's thread."""

    def on_step_end(self, step: int, logs: dict[str, Any]) -> None:
        pass

    def on_eval_end(self, step: int, logs: dict[str, Any]) -> None:
        pass

    def on_train_end(self, history: History) -> None:
        pass


class History:
    """Keras's History: `history.history["loss"]` is the training loss per step,
    `history.history["val_loss"]` the validation loss per evaluation (steps in
    `history.history["val_step"]`); `history.run_dir` is the run directory."""

    def __init__(self, records: list[dict[str, Any]], run_dir: Path):
        self.run_dir = Path(run_dir)
        self.records = records
        self.history: dict[str, list] = {"step": []}
        for record in records:
            if "loss" in record:
                self.history["step"].append(record["step"])
                for key in STEP_KEYS:
                    if key in record:
                        self.history.setdefault(key, []).append(record[key])
            else:
                self.history.setdefault("val_step", []).append(record["step"])
                for key, value in record.items():
                    if key != "step":
                        self.history.setdefault(key if key.startswith("val_") else f"val_{key}", []).append(value)

    @property
    def losses(self) -> list[float]:
        return list(self.history.get("loss", []))

    def __repr__(self) -> str:
        last = f", final loss {self.losses[-1]:.4f}" if self.losses else ""
        return f"History({len(self.losses)} steps{last}, run_dir='{self.run_dir}')"


def read_records(path: Path) -> list[dict[str, Any]]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _as_callback(cb: Any) -> Callback:
    """A Callback, or a plain function f(step, logs) called after each training step."""
    if isinstance(cb, Callback):
        return cb
    if callable(cb):
        wrapped = Callback()
        wrapped.on_step_end = cb  # type: ignore[method-assign]
        return wrapped
    raise TypeError(f"callbacks= takes meshlm.Callback objects or functions f(step, logs), got {cb!r}")


class MetricsWatcher:
    """Follows a metrics.jsonl while a run writes it (a context manager around the run)."""

    def __init__(self, path: Path, total_steps: int, callbacks: Iterable[Any] = (), progress: bool = True):
        self.path = Path(path)
        self.total = total_steps
        self.callbacks = [_as_callback(cb) for cb in callbacks]
        self.progress = progress
        self._stop = threading.Event()
        self._offset = 0
        self._thread = threading.Thread(target=self._follow, daemon=True, name="meshlm-metrics")
        self._bar = None
        self.error: BaseException | None = None

    def __enter__(self) -> MetricsWatcher:
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, unit="step", dynamic_ncols=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()  # the last lines written before the run returned
        if self._bar is not None:
            self._bar.close()

    def _follow(self) -> None:
        while not self._stop.wait(0.2):
            self._poll()

    def _poll(self) -> None:
        try:
            if self.path.stat().st_size < self._offset:  # the file was started afresh
                self._offset = 0
            with open(self.path, encoding="utf-8") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        end = chunk.rfind("\n") + 1  # a line still being written is read next time
        self._offset += len(chunk[:end].encode("utf-8"))
        for line in chunk[:end].splitlines():
            if line.strip():
                self._handle(json.loads(line))

    def _handle(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for cb in self.callbacks:
            try:
                (cb.on_step_end if "loss" in record else cb.on_eval_end)(step, dict(record))
            except BaseException as e:  # raised in the caller once the run has finished
                self.error = self.error or e
        if self._bar is not None:
            if "loss" in record:
                self._bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                self._bar.update(step - self._bar.n)
            else:
                self._bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "step"))


CallbackList = list[Callback | Callable[[int, dict], None]]

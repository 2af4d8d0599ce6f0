"""A progress bar with loss, tokens/s and ETA (tqdm), silent on non-main ranks."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, show_bar: bool = True, is_main: bool = True, printer=print):
        self.printer = printer
        # mininterval keeps logs readable when stderr is a file (CI) rather than a terminal.
        self.bar = (
            tqdm(
                total=total,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=0.5 if sys.stderr.isatty() else 10.0,
            )
            if show_bar and is_main
            else None
        )
        self.done = 0

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        self.bar.update(step - self.done)
        self.done = step

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            self.printer(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

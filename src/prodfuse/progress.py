"""Progress reporting: a tqdm bar on a terminal, plain log lines otherwise (a log file gets no escape codes).

The bottom of the package, like checks.py: it imports nothing from prodfuse.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("prodfuse.progress")


class _Lines:
    """The part of tqdm's interface prodfuse uses, as a log line every `every` seconds and at the end."""

    def __init__(self, total: int, desc: str, unit: str, every: float = 30.0):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n = 0
        self.t0 = self.last = time.monotonic()

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        rate = self.n / max(now - self.t0, 1e-9)
        log.info("%s: %d/%d %s (%.1f %s/s)", self.desc, self.n, self.total, self.unit, rate, self.unit)

    def close(self) -> None:
        if self.total:
            self._line(time.monotonic())

    def set_postfix_str(self, *_args, **_kwargs) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Off(_Lines):
    def _line(self, now: float) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str = "it", enabled: bool = True):
    """A tqdm bar when enabled and stderr is a terminal; periodic log lines when enabled and it is not."""
    if not enabled:
        return _Off(total, desc, unit)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit)
    return _Lines(total, desc, unit)

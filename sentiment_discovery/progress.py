"""Progress of long jobs: a tqdm bar on a terminal, plain lines when stderr goes to a log.

A bar redraws itself with carriage returns, which a log file keeps as one endless line; so where stderr
is not a terminal, ``progress_bar`` returns ``ProgressLines`` instead, which has the bar's
``update``/``set_postfix``/``close`` and iteration, and writes a line such as

    featurizing: 512/1,821 texts (28%) | 19.8 texts/s | 1:06 left | 0:26 elapsed

at most every ``SENTIMENT_DISCOVERY_PROGRESS_INTERVAL`` seconds (default 10) as work finishes, and at
least every six intervals (a minute) while a single unit of work runs longer, plus a last line when a
job that wrote any (or ran an interval) ends. An interval of 0 writes a line at every update (tests).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

INTERVAL_ENV = "SENTIMENT_DISCOVERY_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 10.0  # seconds between lines at most...
SILENCE_INTERVALS = 6  # ...and at least every this many intervals, even while no unit finishes


def line_interval() -> float:
    """Seconds between progress lines: $SENTIMENT_DISCOVERY_PROGRESS_INTERVAL, else 10 (0: every update)."""
    text = os.environ.get(INTERVAL_ENV, "")
    if not text:
        return DEFAULT_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ValueError(f"${INTERVAL_ENV}: {text!r} is not a number of seconds (0 or more)")
    return value


class ProgressLines:
    """A tqdm-like counter that reports in plain lines on stderr (see the module docstring)."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        unit_scale: bool = False,
        initial: int = 0,
    ):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc = iterable, total, desc
        self.unit, self.unit_scale = unit, unit_scale
        self.n = self.initial = initial
        self.postfix = ""
        self.interval = line_interval()
        self.start = self.last_line = time.monotonic()
        self.lines = 0
        self.closed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # a unit of work longer than a minute (a training step of a large model on a CPU) still gets a
        # line a minute, from a thread
        if self.interval > 0:  # with 0, every update writes
            threading.Thread(target=self._watch_silence, daemon=True).start()

    def _count(self, n: float) -> str:
        return tqdm.format_sizeof(n) if self.unit_scale else f"{n:,.0f}"

    def _rate(self, rate: float) -> str:
        if 0 < rate < 1:  # a slow job (a large model's training step): seconds per unit, as tqdm
            return f"{1 / rate:.3g} s/{self.unit}"
        if self.unit_scale:
            return f"{tqdm.format_sizeof(rate)} {self.unit}/s"
        return f"{rate:,.0f} {self.unit}/s" if rate >= 100 else f"{rate:.3g} {self.unit}/s"

    def line(self, now: float | None = None, final: bool = False) -> str:
        now = time.monotonic() if now is None else now
        elapsed = now - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        done = self._count(self.n)
        if self.total:
            done += f"/{self._count(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            done += f" {self.unit}"
        parts = [f"{self.desc}: {done}" if self.desc else done, self._rate(rate)]
        if final:
            parts.append(f"done in {tqdm.format_interval(elapsed)}")
        else:
            if self.total and rate > 0:
                parts.append(f"{tqdm.format_interval((self.total - self.n) / rate)} left")
            parts.append(f"{tqdm.format_interval(elapsed)} elapsed")
        if self.postfix:
            parts.append(self.postfix)
        return " | ".join(parts)

    def _emit(self, now: float, final: bool = False) -> None:
        print(self.line(now, final), file=sys.stderr, flush=True)
        self.last_line, self.lines = now, self.lines + 1

    def _watch_silence(self) -> None:
        silence = SILENCE_INTERVALS * self.interval
        while not self._stop.wait(self.interval):
            with self._lock:
                now = time.monotonic()
                if not self.closed and now - self.last_line >= silence:
                    self._emit(now)

    def update(self, n: float = 1) -> None:
        with self._lock:
            self.n += n
            now = time.monotonic()
            if not self.closed and now - self.last_line >= self.interval:
                self._emit(now)

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        """Stop; a job that wrote any line (or ran a whole interval) ends with a last line."""
        self._stop.set()
        with self._lock:
            if self.closed:
                return
            now = time.monotonic()
            if self.lines or now - self.start >= self.interval:
                self._emit(now, final=True)
            self.closed = True

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return len(self.iterable) if self.iterable is not None else (self.total or 0)

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    unit_scale: bool = False,
    initial: int = 0,
    leave: bool = True,
    enabled: bool = True,
) -> tqdm | ProgressLines:
    """Progress of a long job: a tqdm bar when stderr is a terminal, else ``ProgressLines``; neither
    (a disabled tqdm, which only counts) when not ``enabled`` (a library call, a rank other than 0)."""
    if not enabled:
        return tqdm(iterable, total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(
            iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial, leave=leave
        )
    return ProgressLines(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale, initial=initial)

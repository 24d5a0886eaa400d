"""Progress for long phases (evaluation, calibration, benchmarking, training without a terminal).

On a terminal: a tqdm bar (the one Lightning uses). Otherwise (logs, CI, batch schedulers): a
timestamped line every ``COMPRESS_PROGRESS_SECONDS`` (default 30) with the count, the rate and an ETA,
and one closing line, so a long job's log shows that it moves and when it will end.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


def interval() -> float:
    return float(os.environ.get("COMPRESS_PROGRESS_SECONDS", "30"))


def fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def line(msg: str) -> None:
    """A timestamped ``[compress]`` line on stdout."""
    print(f"[compress {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Ticker:
    """Timestamped progress lines for ``total`` units of work, at most one per ``interval()`` seconds."""

    def __init__(self, label: str, total: Optional[int], unit: str = "batches"):
        self.label, self.total, self.unit = label, total, unit
        self.start = self.last = time.monotonic()
        self.done = 0

    def update(self, n: int = 1, extra: str = "") -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= interval():
            self.last = now
            line(f"{self.label}: {self.status(now)}{extra}")

    def status(self, now: float) -> str:
        elapsed = now - self.start
        text = f"{self.done}/{self.total} {self.unit}" if self.total else f"{self.done} {self.unit}"
        if self.total and self.done:
            eta = elapsed / self.done * (self.total - self.done)
            text += f" ({100 * self.done / self.total:.0f} %), {fmt_seconds(elapsed)} elapsed, ETA {fmt_seconds(eta)}"
        else:
            text += f", {fmt_seconds(elapsed)} elapsed"
        return text

    def close(self) -> None:
        if time.monotonic() - self.start >= interval():  # short phases print nothing extra
            line(f"{self.label}: done, {self.done} {self.unit} in {fmt_seconds(time.monotonic() - self.start)}")


def track(items: Iterable[T], label: str, total: Optional[int] = None, unit: str = "batches") -> Iterator[T]:
    """Iterate ``items`` showing progress: a bar on a terminal, timestamped lines otherwise."""
    if total is None:
        try:
            total = len(items)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if sys.stdout.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=label, total=total, unit=unit[:-1] if unit.endswith("s") else unit,
                        leave=False, dynamic_ncols=True)
        return
    ticker = Ticker(label, total, unit)
    for item in items:
        yield item
        ticker.update()
    ticker.close()

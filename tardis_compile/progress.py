"""Progress lines for long steps, on stderr, throttled; silent when disabled."""

from __future__ import annotations

import sys
import time


class Progress:
    """Counts units (tokens, batches) of one step and prints a line at most every ``interval`` s."""

    def __init__(self, label: str, unit: str = "tokens", enabled: bool = True, interval: float = 2.0) -> None:
        self.label, self.unit, self.enabled, self.interval = label, unit, enabled, interval
        self.count = 0
        self.start = self._last = time.monotonic()

    def step(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if self.enabled and now - self._last >= self.interval:
            self._last = now
            self._print(now)

    def done(self) -> None:
        if self.enabled:
            self._print(time.monotonic(), final=True)

    def _print(self, now: float, final: bool = False) -> None:
        elapsed = now - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        end = " done" if final else ""
        print(f"[tardis] {self.label}: {self.count:,} {self.unit} in {elapsed:.1f}s ({rate:,.0f}/s){end}",
              file=sys.stderr, flush=True)

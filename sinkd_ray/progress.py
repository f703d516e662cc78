"""Progress lines for the steps a user waits on: done / total, speed and time left, at most every ~30 s.

    line = ProgressLine("teacher logits", total=8551, unit="examples")
    for batch in batches:
        ...
        line.update(done)          # prints only when SINKD_PROGRESS_EVERY_S (default 30) has passed since the last

Printed with flush, so Ray's log stream carries a worker's lines to the driver as they come (prefixed with the
worker); nothing a user waits for stays silent for more than a minute.
"""

from __future__ import annotations

import os
import time

EVERY_ENV = "SINKD_PROGRESS_EVERY_S"


def duration(seconds: float) -> str:
    """12 s, 3 min 05 s, 1 h 02 min."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ProgressLine:
    """``what: done/total unit (p %), rate unit/s, ETA t`` every ``every_s`` seconds while work goes on."""

    def __init__(self, what: str, total: int, unit: str = "examples", every_s: float | None = None, enabled=True):
        self.what, self.total, self.unit, self.enabled = what, max(1, int(total)), unit, enabled
        self.every_s = float(os.environ.get(EVERY_ENV, "30")) if every_s is None else every_s
        self.t0 = self.last = time.monotonic()
        self.start_done = None
        self.finished = False

    def update(self, done: int, extra: str = "", rate_scale: float = 1.0) -> bool:
        """Say where the work stands if ``every_s`` has passed since the last line; returns whether it printed.
        ``rate_scale``: units per counted item (e.g. examples per step) for the speed."""
        now = time.monotonic()
        if self.start_done is None:  # the first call marks where this process started (a resumed run: not 0)
            self.start_done, self.t0, self.last = done, now, now
            return False
        # The end of a step that took longer than one interval is said at once: the next step's own first line comes
        # only an interval later, and the two silences together exceeded a minute (61 s seen in `make demo`).
        finishing = done >= self.total and not self.finished and now - self.t0 >= self.every_s
        if not self.enabled or (now - self.last < self.every_s and not finishing):
            return False
        self.finished = self.finished or done >= self.total
        self.last = now
        elapsed = now - self.t0
        rate = (done - self.start_done) / elapsed if elapsed > 0 else 0.0
        left = (self.total - done) / rate if rate > 0 else float("nan")
        eta = duration(left) if left == left else "?"
        print(
            f"{self.what}: {done}/{self.total} {self.unit} ({100 * done / self.total:.0f} %), "
            f"{rate * rate_scale:.1f} examples/s, ETA {eta}{f' ({extra})' if extra else ''}",
            flush=True,
        )
        return True

"""Wall-clock time, swappable so tests can drive it with Trio's MockClock.

Everything in watcher that stamps or compares times (event timestamps, invoice expiry,
webhook retry schedules) asks a :class:`Clock`, never ``time.time()`` directly.
"""

from __future__ import annotations

import time

import trio


class Clock:
    """The system's wall clock."""

    def now(self) -> float:
        return time.time()

    def now_ms(self) -> int:
        return int(self.now() * 1000)

    async def sleep_until(self, wall: float) -> None:
        """Sleep until the wall clock reads ``wall`` (returns at once if it already has)."""
        delay = wall - self.now()
        if delay > 0:
            await trio.sleep(delay)


class TrioClock(Clock):
    """Wall time that advances with Trio's clock: ``anchor`` at the first reading, then
    anchor + elapsed Trio time. Under ``MockClock`` (autojump) hours pass in milliseconds."""

    def __init__(self, anchor: float | None = None):
        self._anchor = time.time() if anchor is None else anchor
        self._start: float | None = None

    def now(self) -> float:
        t = trio.current_time()
        if self._start is None:
            self._start = t
        return self._anchor + (t - self._start)

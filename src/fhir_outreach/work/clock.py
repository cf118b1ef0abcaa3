"""Time as a seam: the journey runtime asks a ``Clock`` for "now" (epoch seconds) instead of the system, so
tests and ``journey simulate`` run weeks of waits in milliseconds under a ``ManualClock``."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...


class SystemClock:
    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock that only moves when told to (``advance``/``set``)."""

    def __init__(self, start: float | datetime = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self._now = start.timestamp() if isinstance(start, datetime) else float(start)

    def now(self) -> float:
        return self._now

    def set(self, moment: float | datetime) -> None:
        self._now = moment.timestamp() if isinstance(moment, datetime) else float(moment)

    def advance(self, seconds: float) -> None:
        self._now += seconds


def to_datetime(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def fhir_instant(epoch: float) -> str:
    return to_datetime(epoch).isoformat(timespec="seconds").replace("+00:00", "Z")

"""The search's time budget: it counts searching only (scoring candidates, breeding), not
loading, calibration, decomposition, sensitivity or the dense model's reference scores."""
from __future__ import annotations

import time

now = time.perf_counter  # the clock; tests replace it (monkeypatch) to play a slow box


class Budget:
    """Seconds spent searching, including those of earlier runs of a resumed search."""

    def __init__(self, minutes: float | None, spent_before: float = 0.0):
        self.seconds = None if minutes is None else float(minutes) * 60.0
        self.spent_before = float(spent_before)
        self._start = None

    def start(self) -> "Budget":
        self._start = now()
        return self

    def elapsed(self) -> float:
        return self.spent_before + (0.0 if self._start is None else now() - self._start)

    def left(self) -> float | None:
        return None if self.seconds is None else max(self.seconds - self.elapsed(), 0.0)

    def allows(self, cost: float) -> bool:
        """Whether work expected to take ``cost`` seconds still fits."""
        return self.seconds is None or self.elapsed() + cost <= self.seconds

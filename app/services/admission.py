"""Bounded admission: at most `max_queue` requests in flight, the rest refused with 429."""

from __future__ import annotations

from app.errors import RateLimited
from app.metrics import Metrics


class Slot:
    """One admitted request. Released exactly once: explicitly, or when garbage-collected
    (a stream whose client vanished before it started is never iterated)."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        admission, self._admission = self._admission, None
        if admission is not None:
            admission._release()

    def __del__(self) -> None:
        self.release()


class Admission:
    def __init__(self, max_queue: int, metrics: Metrics) -> None:
        self._max = max_queue
        self._inflight = 0
        self._metrics = metrics

    @property
    def inflight(self) -> int:
        return self._inflight

    def acquire(self) -> Slot:
        if self._inflight >= self._max:
            self._metrics.rejected.inc()
            raise RateLimited(
                f"The server is at capacity ({self._max} requests in flight); retry shortly.",
                headers={"Retry-After": "1"},
            )
        self._inflight += 1
        self._metrics.inflight.set(self._inflight)
        return Slot(self)

    def _release(self) -> None:
        self._inflight -= 1
        self._metrics.inflight.set(self._inflight)

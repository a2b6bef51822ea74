"""CPU threads for training on a machine whose cores the engine shares.

On a CPU box the engine and the training run compete for the same few cores, and an OpenMP
pool larger than the free cores slows both badly (spinning threads wait on each other). But the
train stage itself sends the engine nothing: most of the time it is idle, and a training run
held to "all cores but one" leaves a core unused. `ThreadBudget` gives training every core while
the engine has no requests and steps back to all but one as soon as it serves any; the worker
polls the gateway's metrics for that (`engine_is_busy`), and the training thread applies the
current budget between optimizer steps.

Measured on the 2-core box (2026-11-25, 20 steps of a pipeline job's data, no engine running):
1 thread 24.4 s, 2 threads 17.4 s.
"""

from __future__ import annotations

import logging
import os
import threading

import httpx
from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

LOAD_METRICS = ("selfadapt_requests_in_flight", "selfadapt_engine_queue_depth")
"""Gauges of the gateway's /metrics that are non-zero while the engine serves someone."""


def cpu_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class ThreadBudget:
    """The thread count training should use now: ``idle`` while the engine is idle, ``busy``
    while it serves. Written by the poller (event loop), read by the training thread."""

    def __init__(self, idle: int, busy: int) -> None:
        if idle < 1 or busy < 1:
            raise ValueError("thread counts must be >= 1")
        self.idle, self.busy = idle, busy
        self._engine_busy = threading.Event()
        self._applied: int | None = None
        self.steps_at: dict[int, int] = {}
        """Optimizer steps run at each thread count, counted by ``apply`` after each step (the
        first at ``start``)."""

    @classmethod
    def for_cpu(cls, cores: int | None = None) -> ThreadBudget:
        """Every core when the engine is idle, all but one while it serves."""
        n = cores or cpu_cores()
        return cls(idle=n, busy=max(1, n - 1))

    @classmethod
    def fixed(cls, threads: int) -> ThreadBudget:
        return cls(idle=threads, busy=threads)

    @property
    def start(self) -> int:
        """The thread count a training run starts at, before the first ``apply``: ``busy``
        (the engine may be serving when it starts)."""
        return self.busy

    @property
    def adaptive(self) -> bool:
        return self.idle != self.busy

    def engine_busy(self, busy: bool) -> None:
        if busy:
            self._engine_busy.set()
        else:
            self._engine_busy.clear()

    @property
    def threads(self) -> int:
        return self.busy if self._engine_busy.is_set() else self.idle

    def apply(self) -> int:
        """Sets torch's intra-op threads to the current budget (call from the training thread
        between steps); returns the count in effect."""
        import torch

        ran = self._applied if self._applied is not None else self.start
        self.steps_at[ran] = self.steps_at.get(ran, 0) + 1
        want = self.threads
        if want != self._applied:
            torch.set_num_threads(want)
            if self._applied is not None:
                logger.debug("training threads %d -> %d", self._applied, want)
            self._applied = want
        return want


def parse_load(metrics_text: str) -> bool:
    """Whether the gateway's Prometheus exposition shows requests in flight or in the engine."""
    for family in text_string_to_metric_families(metrics_text):
        if family.name in LOAD_METRICS and any(s.value > 0 for s in family.samples):
            return True
    return False


async def engine_is_busy(http: httpx.AsyncClient) -> bool | None:
    """Reads the gateway's /metrics; None when it cannot be read (treated as busy)."""
    try:
        response = await http.get("/metrics", timeout=2.0)
        response.raise_for_status()
        return parse_load(response.text)
    except (httpx.HTTPError, ValueError) as e:
        logger.debug("gateway metrics unreadable: %s", e)
        return None


def default_threads() -> int | None:
    """Threads for a training run that cannot watch the engine: all cores but one on CPU (the
    engine's worker keeps one busy while it serves; measured: an oversubscribed OpenMP pool
    slows training ~10x on 2 cores), torch's default (None) on CUDA."""
    budget = training_budget(None)
    return budget.busy if budget is not None else None


def training_budget(threads: int | None, *, adaptive: bool = False) -> ThreadBudget | None:
    """``threads`` fixed; else on CPU all cores but one, or (``adaptive``) every core while
    the engine is idle and all but one while it serves; None on CUDA (torch's default)."""
    import torch

    if threads is not None:
        return ThreadBudget.fixed(threads)
    if torch.cuda.is_available():
        return None
    budget = ThreadBudget.for_cpu()
    return budget if adaptive else ThreadBudget.fixed(budget.busy)

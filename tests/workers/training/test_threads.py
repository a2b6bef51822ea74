"""Training's CPU thread budget: all cores while the engine is idle, all but one while it serves."""

from __future__ import annotations

import httpx
import pytest
import torch

from workers.training.threads import (
    ThreadBudget,
    engine_is_busy,
    parse_load,
    training_budget,
)

IDLE_METRICS = """# HELP selfadapt_requests_in_flight Requests admitted and not finished
# TYPE selfadapt_requests_in_flight gauge
selfadapt_requests_in_flight 0.0
# HELP selfadapt_engine_queue_depth Unfinished requests inside the engine
# TYPE selfadapt_engine_queue_depth gauge
selfadapt_engine_queue_depth 0.0
"""


def test_parse_load_reads_the_gateway_gauges() -> None:
    assert parse_load(IDLE_METRICS) is False
    assert parse_load(IDLE_METRICS.replace("in_flight 0.0", "in_flight 3.0")) is True
    assert parse_load(IDLE_METRICS.replace("queue_depth 0.0", "queue_depth 1.0")) is True
    assert parse_load("") is False


def test_budget_follows_the_engine_and_applies_between_steps() -> None:
    before = torch.get_num_threads()
    try:
        budget = ThreadBudget.for_cpu(cores=2)
        assert (budget.idle, budget.busy, budget.adaptive) == (2, 1, True)
        assert budget.apply() == 2
        assert torch.get_num_threads() == 2
        budget.engine_busy(True)
        assert budget.apply() == 1
        assert torch.get_num_threads() == 1
        budget.engine_busy(False)
        assert budget.apply() == 2
        # What the train stage's event reports: the steps each count ran (the first at busy).
        assert budget.steps_at == {1: 2, 2: 1}
    finally:
        torch.set_num_threads(before)


def test_single_core_and_fixed_budgets_never_change() -> None:
    one = ThreadBudget.for_cpu(cores=1)
    assert (one.idle, one.busy, one.adaptive) == (1, 1, False)
    cpu = ThreadBudget.for_cpu()
    default = training_budget(None)  # not adaptive unless asked: all cores but one, fixed
    assert default is not None
    assert (default.idle, default.adaptive) == (cpu.busy, False)
    adaptive = training_budget(None, adaptive=True)
    assert adaptive is not None
    assert (adaptive.idle, adaptive.busy) == (cpu.idle, cpu.busy)
    fixed = training_budget(3)
    assert fixed is not None
    assert (fixed.idle, fixed.busy, fixed.adaptive) == (3, 3, False)
    with pytest.raises(ValueError, match=">= 1"):
        ThreadBudget(idle=0, busy=1)


async def test_engine_is_busy_over_http() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/metrics":
            return httpx.Response(404)
        return httpx.Response(200, text=IDLE_METRICS.replace("in_flight 0.0", "in_flight 2.0"))

    async with httpx.AsyncClient(
        base_url="http://gw", transport=httpx.MockTransport(handler)
    ) as http:
        assert await engine_is_busy(http) is True

    async with httpx.AsyncClient(
        base_url="http://gw", transport=httpx.MockTransport(lambda r: httpx.Response(500))
    ) as http:
        assert await engine_is_busy(http) is None  # unknown: the worker treats it as busy


def test_the_train_stage_reports_steps_per_thread_count() -> None:
    from workers.tasks.train import _thread_use

    budget = ThreadBudget.for_cpu(cores=2)
    assert _thread_use(budget) == ""  # no step yet
    budget.steps_at.update({2: 60, 1: 40})
    assert _thread_use(budget) == "2 threads: 60 steps, 1 thread: 40 steps"
    budget.steps_at.update({2: 99, 1: 1})
    assert _thread_use(budget) == "2 threads: 99 steps, 1 thread: 1 step"
    assert _thread_use(ThreadBudget.fixed(2)) == ""  # a fixed budget has nothing to report
    assert _thread_use(None) == ""

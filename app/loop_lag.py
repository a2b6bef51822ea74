"""How late the gateway's event loop runs: while it is stalled (a blocking call, a starved
process) every request waits, and uvicorn may close idle keep-alive connections under clients
whose next request is already on the wire. Measured as the delay of a short timer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)


async def watch_loop_lag(
    observe: Callable[[float], None], *, interval_s: float = 0.25, warn_s: float = 1.0
) -> None:
    """Forever: sleep `interval_s`, `observe` how much later than that the loop woke, and log a
    warning when that reaches `warn_s`. Run as a task; cancel it to stop."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval_s)
        lag = max(0.0, loop.time() - start - interval_s)
        observe(lag)
        if lag >= warn_s:
            logger.warning(
                "event loop stalled for %.1f s: requests waited that long "
                "(selfadapt_event_loop_lag_seconds on /metrics)",
                lag,
            )

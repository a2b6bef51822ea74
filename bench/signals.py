"""Benchmarks stop cleanly on SIGTERM: the engines and servers they started go with them."""

from __future__ import annotations

import signal
import sys


def exit_on_sigterm() -> None:
    """Makes SIGTERM unwind like Ctrl-C (``SystemExit(143)`` in the main thread).

    Python's default SIGTERM action ends the process at once, skipping ``finally`` blocks and
    context managers, so a benchmark killed that way leaves its vLLM EngineCore process, its
    gateway and worker subprocesses and its embedded Redis running. Call it first in ``main``.
    """
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

"""Processes that start others stop them on SIGTERM: the signal unwinds like Ctrl-C."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable
from types import FrameType


def exit_on_sigterm(signals: Iterable[signal.Signals] = (signal.SIGTERM,)) -> None:
    """Makes each of ``signals`` raise ``SystemExit(128 + signum)`` in the main thread, once.

    Python's default SIGTERM action ends the process at once, skipping ``finally`` blocks and
    context managers, so a process killed that way leaves what it started running (a vLLM
    EngineCore, gateway and worker subprocesses, an embedded Redis). Uvicorn re-raises the
    signal it shut down on, so this also runs after a graceful gateway shutdown. Once one of
    the signals has arrived, repeats of any of them are ignored: a second SIGTERM or Ctrl-C
    while the process stops its children would otherwise interrupt that cleanup and orphan
    them. Call it first in ``main``.
    """
    watched = tuple(signals)

    def stopping(signum: int, frame: FrameType | None) -> None:
        message = f"{signal.Signals(signum).name}: already stopping, please wait\n"
        os.write(sys.stderr.fileno(), message.encode())

    def first(signum: int, frame: FrameType | None) -> None:
        for sig in watched:
            signal.signal(sig, stopping)
        sys.exit(128 + signum)

    for sig in watched:
        signal.signal(sig, first)

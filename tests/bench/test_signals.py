"""Benchmarks unwind on SIGTERM, so what they started (engines, servers) is stopped."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = """
import sys, time
from pathlib import Path
from bench.signals import exit_on_sigterm

exit_on_sigterm()
try:
    Path(sys.argv[1]).write_text("started")
    time.sleep(60)
finally:
    Path(sys.argv[1]).write_text("cleaned up")
"""


def test_sigterm_runs_finally_blocks_and_exits_143(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(marker)], cwd=Path.cwd())
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline, "the script did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert marker.read_text() == "cleaned up"

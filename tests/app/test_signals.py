"""Processes that start others unwind on SIGTERM, so what they started is stopped too."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = """
import sys, time
from pathlib import Path
from app.signals import exit_on_sigterm

exit_on_sigterm()
marker = Path(sys.argv[1])
try:
    marker.write_text("started")
    time.sleep(60)
finally:
    marker.write_text("stopping")
    time.sleep(1.0)  # a slow cleanup, as stopping a worker and Redis is
    marker.write_text("cleaned up")
"""


def _started(marker: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(marker)], cwd=Path.cwd(), stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline, "the script did not start"
        time.sleep(0.05)
    return proc


def test_sigterm_runs_finally_blocks_and_exits_143(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    proc = _started(marker)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert marker.read_text() == "cleaned up"


def test_a_second_sigterm_does_not_cut_the_cleanup_short(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    proc = _started(marker)
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while marker.read_text() != "stopping":
        assert time.monotonic() < deadline, "the cleanup did not start"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert marker.read_text() == "cleaned up"
    assert b"SIGTERM: already stopping" in err

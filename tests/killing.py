"""Start an ``adaquantfl run`` in a subprocess and SIGKILL it once its checkpoint passes a round."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from adaquantfl.runner.checkpoint import CheckpointError, load_checkpoint


def kill_after_checkpoint(args: list[str], checkpoint: Path, *, round_at_least: int = 1,
                          timeout_s: float = 300) -> subprocess.Popen[bytes]:  # fmt: skip
    """Run ``python -m adaquantfl *args``; kill -9 it once ``checkpoint`` holds a late enough round.

    Returns the finished process (its return code is ``-SIGKILL`` if it was
    killed mid-run); fails the test if the run ends or stalls first.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "adaquantfl", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if checkpoint.exists():
                try:
                    if load_checkpoint(checkpoint)[0]["round"] >= round_at_least:
                        break
                except CheckpointError:
                    pass  # between the writes of a checkpoint and its .prev
            assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr}"
            assert time.monotonic() < deadline, f"no checkpoint of round {round_at_least} in time"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc

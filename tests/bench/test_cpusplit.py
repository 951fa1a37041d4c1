"""bench.cpusplit counts CPU from "go": a worker process's start-up before it (imports,
~0.2 s each) is kept apart, so that it does not read as CPU per job growing with the
number of processes (issue 16)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

from bench.cpusplit import Sampler
from bench.procs import cpu_seconds

# Stands for a worker's start-up: CPU burnt before it says ready, then it waits for go.
STARTUP = """
import sys, time
while time.process_time() < 0.5:
    pass
print("ready", flush=True)
sys.stdin.readline()
"""


def test_the_sampler_leaves_out_what_a_process_used_before_go() -> None:
    marker = f"cpusplit-test-{uuid.uuid4().hex}"
    proc = subprocess.Popen(
        [sys.executable, "-c", STARTUP, marker],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    sampler = Sampler(marker=marker)
    sampler.start()
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        burnt = cpu_seconds(proc.pid)
        sampler.from_now()
        # A reading after go, with the process still there to be read.
        deadline = time.monotonic() + 30
        while sampler.last["worker"].get(proc.pid, 0.0) < burnt:
            assert time.monotonic() < deadline, "the sampler never read the process"
            time.sleep(0.01)
        used = sampler.used("worker")
    finally:
        sampler.stop.set()
        sampler.join()
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.close()
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()
    assert burnt >= 0.4  # /proc counts in ticks (10 ms)
    assert sampler.before["worker"] >= 0.4
    assert used < 0.25  # a few ticks of waiting on its stdin at most

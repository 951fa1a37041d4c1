"""Worker processes started by the harness and timed through the bench.worker protocol."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.systems import WorkerConfig, argv_for


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


READY_TIMEOUT = 60.0


class WorkerGroup:
    """``processes`` processes running ``python -m <module...>``, each speaking the
    bench.worker protocol (ready / go / done on stdin and stdout). Always used as a
    context manager: whatever happens, no process outlives it. ``of_queue`` starts
    bench.worker for one queue; the constructor any other module (bench.leanworker)."""

    def __init__(
        self,
        name: str,
        module: Sequence[str],
        processes: int,
        *,
        log_dir: Path,
        stamps_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.module = module
        self.n = processes
        self.log_dir = log_dir
        self.stamps_dir = stamps_dir
        self.procs: list[subprocess.Popen[str]] = []
        self.lines: list[queue.Queue[str]] = []
        self.pumps: list[threading.Thread] = []
        self.t0 = 0.0

    @classmethod
    def of_queue(
        cls,
        system: str,
        dsn: str,
        config: WorkerConfig,
        processes: int,
        *,
        mode: str = "drain",
        log_dir: Path,
        stamps_dir: Path | None = None,
        expect: int | None = None,
    ) -> WorkerGroup:
        """bench.worker processes of one queue, with its settings; ``expect``: the count
        of completed jobs at which a drain is over (bench.worker --expect, awa only)."""
        module = ["bench.worker", system, dsn, *argv_for(config), "--mode", mode]
        if expect is not None:
            module += ["--expect", str(expect)]
        return cls(system, module, processes, log_dir=log_dir, stamps_dir=stamps_dir)

    def __enter__(self) -> WorkerGroup:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.n):
            env = dict(os.environ)
            env.pop("BENCH_STAMPS", None)
            if self.stamps_dir is not None:
                env["BENCH_STAMPS"] = str(self.stamps_dir / f"{self.name}-{i}.json")
            log = (self.log_dir / f"{self.name}-worker-{i}.log").open("a")
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", *self.module],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
                cwd=Path(__file__).resolve().parents[1],
            )
            log.close()
            lines: queue.Queue[str] = queue.Queue()
            pump = threading.Thread(target=_pump, args=(proc, lines), daemon=True)
            pump.start()
            self.pumps.append(pump)
            self.procs.append(proc)
            self.lines.append(lines)
        try:
            for i in range(self.n):
                self._expect(i, "ready", READY_TIMEOUT)
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def _expect(
        self,
        i: int,
        word: str,
        timeout: float,
        watch: Callable[[], None] | None = None,
        every: float = 10.0,
    ) -> str:
        """The next line of process i, which must start with ``word``, within ``timeout``
        seconds; ``watch`` is called every ``every`` seconds of waiting and may raise to
        end the wait early (a drain that stopped making progress)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self.lines[i].get(timeout=max(0.01, min(left, every) if watch else left))
                break
            except queue.Empty:
                if left <= every or watch is None:
                    raise TimeoutError(
                        f"{self.name} worker {i} did not say {word!r} within {timeout:.0f}s "
                        f"(see {self.log_dir})"
                    ) from None
                watch()
        if not line.startswith(word):
            raise RuntimeError(f"{self.name} worker {i} said {line!r}, expected {word!r}")
        return line

    def go(self) -> float:
        self.t0 = time.monotonic()
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return self.t0

    def stop(self) -> None:
        """serve mode: ask every process to shut down gracefully."""
        for proc in self.procs:
            if proc.stdin is not None and proc.poll() is None:
                proc.stdin.write("stop\n")
                proc.stdin.flush()

    def results(
        self, timeout: float, watch: Callable[[], None] | None = None, every: float = 10.0
    ) -> list[float]:
        """The number each process reports with its "done" line (bench.worker: the
        monotonic time its run call returned), the processes still running; ``watch``
        and ``every`` as in _expect."""
        deadline = time.monotonic() + timeout
        return [
            float(
                self._expect(
                    i, "done", max(0.1, deadline - time.monotonic()), watch, every
                ).split()[1]
            )
            for i in range(self.n)
        ]

    def wait(
        self, timeout: float, watch: Callable[[], None] | None = None, every: float = 10.0
    ) -> list[float]:
        """The monotonic time at which each process's run call returned; ``watch`` and
        ``every`` as in _expect."""
        deadline = time.monotonic() + timeout
        done = self.results(timeout, watch, every)
        for proc in self.procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        return done

    def kill(self) -> None:
        for proc, pump in zip(self.procs, self.pumps, strict=True):
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            if proc.stdin is not None:
                proc.stdin.close()
            # The pump reads stdout to its end (the process has exited); then it can be
            # closed without pulling it from under the pump.
            pump.join(timeout=10)
            if proc.stdout is not None and not pump.is_alive():
                proc.stdout.close()


def _pump(proc: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line.strip())
    lines.put("exited")

"""``fhir-outreach worker`` processes for tests: start them against a store, SIGKILL them, replace them.

Each worker gets the environment of the ``serve`` under test (same store, settings and data directory) and
its own log file; ``close`` stops whatever is still running (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

from tests.servers import OUTREACH, stop


class Workers:
    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env = env
        self.tmp = tmp
        self.running: list[subprocess.Popen[bytes]] = []
        self.started = 0
        self.killed = 0
        self.numbers: dict[int, int] = {}  # pid -> worker number (its log file)

    def start(self, n: int = 1) -> None:
        for _ in range(n):
            self.started += 1
            log = (self.tmp / f"worker-{self.started}.log").open("wb")
            proc = subprocess.Popen([OUTREACH, "worker"], env=self.env, cwd=self.tmp, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            self.numbers[proc.pid] = self.started
            self.running.append(proc)

    def kill_one(self, rng: random.Random) -> None:
        """SIGKILL a random running worker and start another."""
        self.kill(self.running[rng.randrange(len(self.running))])

    def kill(self, victim: subprocess.Popen[bytes]) -> None:
        """SIGKILL this worker (no shutdown: claims and writes in flight) and start another."""
        self.running.remove(victim)
        victim.kill()
        victim.wait()
        self.killed += 1
        self.start()

    def ready(self) -> bool:
        """Whether every running worker has connected to the store."""
        return all("connected to the store" in self._log(p).read_text(errors="replace") for p in self.running)

    def _log(self, proc: subprocess.Popen[bytes]) -> Path:
        return self.tmp / f"worker-{self.numbers[proc.pid]}.log"

    def check_alive(self) -> None:
        for proc in self.running:
            if proc.poll() is not None:
                raise AssertionError(f"a worker exited by itself with status {proc.returncode}:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted(self.tmp.glob("worker-*.log")))

    def close(self) -> None:
        for proc in self.running:
            stop(proc)
        self.running = []

"""Real server processes for tests: sekmet-fhir (the upstream FHIR server) and ``fhir-outreach serve``.

sekmet-fhir runs in its own virtual environment (its pins differ from ours). The fixture creates it in
``.sekmet-venv`` at the repository root on first use (``pip install sekmet-fhir`` from PyPI) unless
``SEKMET_BIN`` names an existing executable. Everything binds to 127.0.0.1 on free ports; every process
is stopped by the fixture that started it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
OUTREACH = str(Path(sys.executable).parent / "fhir-outreach")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{url} did not come up in {timeout}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def sekmet_bin() -> str:
    configured = os.environ.get("SEKMET_BIN")
    if configured and Path(configured).exists():
        return configured
    venv = ROOT / ".sekmet-venv"
    exe = venv / "bin" / "sekmet"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "sekmet-fhir>=0.1.1,<0.2"], check=True)
    return str(exe)


class Sekmet:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/fhir"
        tmp.mkdir(parents=True, exist_ok=True)
        settings = tmp / "sekmet.yaml"
        settings.write_text(f"host: 127.0.0.1\nport: {self.port}\nbase_url: {self.base}\n"
                            f"data_dir: {tmp / 'data'}\nsimulator:\n  enabled: false\n")
        self.log = tmp / "sekmet.log"
        self.proc = subprocess.Popen([sekmet_bin(), "serve", "-c", str(settings)], cwd=tmp,
                                     stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        wait_http(f"{self.base}/metadata", self.proc, self.log)

    def stop(self) -> None:
        stop(self.proc)


class Outreach:
    """``fhir-outreach serve`` as a real process."""

    def __init__(self, tmp: Path, token: str, **settings: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_OUTREACH_")}
        self.env.update({"FHIR_OUTREACH_STORE": f"sqlite:///{tmp}/outreach.db",
                         "FHIR_OUTREACH_DATA_DIR": str(tmp / "outreach-data"), "FHIR_OUTREACH_HOST": "127.0.0.1",
                         "FHIR_OUTREACH_PORT": str(self.port), "FHIR_OUTREACH_API_TOKENS": token,
                         "FHIR_OUTREACH_WORKER_POLL_SECONDS": "0.2", **settings})
        self.tmp = tmp
        self.log = tmp / f"outreach-{self.port}.log"
        self.proc = subprocess.Popen([OUTREACH, "serve"], env=self.env, cwd=tmp, stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT)
        wait_http(f"{self.url}/healthz", self.proc, self.log)
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([OUTREACH, *args], env=self.env, cwd=self.tmp, capture_output=True, text=True,
                              timeout=120)

    def stop(self) -> None:
        self.http.close()
        stop(self.proc)


def wait_for(check: Any, timeout: float = 20.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met in {timeout}s (last value: {last!r})")

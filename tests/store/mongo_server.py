"""A real MongoDB wire-protocol server for tests: ``nx-27017`` (SQLite underneath) on a free local port.

Not a conftest: fixtures import ``nx27017()`` (a context manager yielding ``mongodb://127.0.0.1:PORT``) or the
``start_nx27017()`` / ``stop_nx27017()`` pair. Each server is in-memory and gets its own pid and log files
(nx-27017 refuses to start while its default ``/tmp/nx_27017.pid`` names a running process).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pymongo import MongoClient
from pymongo.errors import PyMongoError

START_TIMEOUT = 20.0


def _executable() -> str:
    beside = Path(sys.executable).parent / "nx-27017"
    if beside.exists():
        return str(beside)
    found = shutil.which("nx-27017")
    if found is None:
        raise RuntimeError("nx-27017 is not installed (pip install nx-27017): the tests have no MongoDB")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _log_tail(proc: subprocess.Popen[bytes]) -> str:
    log = Path(getattr(proc, "nx_workdir", "")) / "output.log"
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


def start_nx27017(timeout: float = START_TIMEOUT) -> tuple[str, subprocess.Popen[bytes]]:
    """Start a server; returns (``mongodb://127.0.0.1:PORT/fhir_outreach_test_<random>``, process) once it
    answers a ping. Raises RuntimeError (with the server's output) if it does not within ``timeout``."""
    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="nx27017-"))
    args = [_executable(), "--db", "memory", "-p", str(port), "--host", "127.0.0.1",
            "--pid-file", str(workdir / "nx.pid"), "--log-file", str(workdir / "nx.log")]
    with (workdir / "output.log").open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proc.nx_workdir = str(workdir)  # type: ignore[attr-defined]
    base = f"mongodb://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            output = _log_tail(proc)
            stop_nx27017(proc)
            raise RuntimeError(f"nx-27017 exited with status {proc.returncode} on port {port}:\n{output}")
        client: MongoClient[dict[str, object]] = MongoClient(base, serverSelectionTimeoutMS=250,
                                                              connectTimeoutMS=250)
        try:
            client.admin.command("ping")
            break
        except PyMongoError:
            if time.monotonic() > deadline:
                output = _log_tail(proc)
                stop_nx27017(proc)
                raise RuntimeError(f"nx-27017 did not answer a ping on port {port} within {timeout:.0f} s:\n"
                                   f"{output}") from None
            time.sleep(0.1)
        finally:
            client.close()
    return f"{base}/fhir_outreach_test_{uuid.uuid4().hex[:12]}", proc


def stop_nx27017(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the server (kill it if it does not stop within 5 s) and remove its files."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    workdir = getattr(proc, "nx_workdir", None)
    if workdir:
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def nx27017(timeout: float = START_TIMEOUT) -> Iterator[str]:
    """A running server for the duration of the block; yields its base URL ``mongodb://127.0.0.1:PORT``."""
    url, proc = start_nx27017(timeout)
    try:
        yield url.rsplit("/", 1)[0]
    finally:
        stop_nx27017(proc)

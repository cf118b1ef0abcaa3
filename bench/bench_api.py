#!/usr/bin/env python3
"""End-to-end benchmark of the fhir-outreach FHIR API over real HTTP, per store backend.

For each store (SQLite, MongoDB via a local ``nx-27017`` wire-compatible server) one run:

1. starts a real ``fhir-outreach serve`` subprocess on a free 127.0.0.1 port with a fresh temporary data dir
   (and an ``nx-27017 --db memory`` subprocess for MongoDB) and waits for ``/healthz``;
2. creates N Task resources with single ``POST /fhir/Task`` requests from a local async httpx client
   (keep-alive, ``--concurrency`` requests in flight) and reports creates/s; then creates a further slice
   (``--batch-fraction`` of N) as ``batch`` Bundles of ``--batch-size`` creates (``POST /fhir``) and reports
   those creates/s separately;
3. reads ``GET /fhir/Task/{id}`` for random ids (reads/s, same concurrency);
4. searches ``GET /fhir/Task?patient=Patient/pX&status=requested`` sequentially from one client (so the
   figure is the server's latency, not queueing) at 10%, 50% and 100% of N, reporting p50/p95/p99;
5. samples the server's RSS (``/proc/<pid>/status`` VmRSS) at start and at each checkpoint, and its peak
   (VmHWM) at the end.

The load is paused at each checkpoint while RSS and search latency are sampled; creates/s counts only the
time spent creating. Tasks are assigned to patients in blocks of 100 (task i -> Patient/p{i // 100}), so the
store grows by adding patients and every fully-populated patient has ~100 Tasks (~25 ``requested``) at every
checkpoint: the search result size stays constant and only the store size changes.

The client runs on the same machine as the server (and nx-27017): all compete for the same cores. The
script reports the CPU time the client, the server, nx-27017 and everything else used in each phase. The client
is httpx (one single-connection ``AsyncClient`` per in-flight slot, see ``Bench.client``); ``--client raw``
swaps in a minimal asyncio HTTP/1.1 client that costs ~10x less CPU per request, to show the server's own
capacity on a small machine. ``--profile`` records the server with py-spy during chosen phases.

Every process the script starts binds to 127.0.0.1 and is stopped on exit, error or Ctrl-C.

    /work/venv/bin/python bench/bench_api.py --quick --store both
    /work/venv/bin/python bench/bench_api.py --store sqlite --tasks 100000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import inspect
import json
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import orjson

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BIN = Path(sys.executable).parent
SERVE = [str(BIN / "fhir-outreach"), "serve"]
NX = str(BIN / "nx-27017")
STATUSES = ("requested", "in-progress", "completed", "cancelled")
CODES = (("http://hl7.org/fhir/CodeSystem/task-code", "fulfill"),
         ("http://example.org/fhir-outreach/task-code", "outreach-call"),
         ("http://example.org/fhir-outreach/task-code", "goal-follow-up"))
TASKS_PER_PATIENT = 100
CHECKPOINTS = (0.1, 0.5, 1.0)
FHIR_JSON = "application/fhir+json"
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGETS = {"creates_per_s": 1500, "search_p95_ms": 20.0, "rss_growth_pct": 15.0}


# --- processes -------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Processes:
    """Every subprocess this script starts; ``stop_all`` ends them (SIGTERM, then SIGKILL), by pid."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as fh:
            # own session: Ctrl-C in the terminal reaches only this script, which then stops the children
            proc = subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the group this script created for it
                proc.wait(5)
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB) from /proc/<pid>/status."""
    out = {"VmRSS": 0, "VmHWM": 0}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (``fhir-outreach serve`` with FHIR_OUTREACH_PROCESSES > 1 runs its
    workers as children), found by scanning /proc for parent ids."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo and len(out) < 1000:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def tree_memory_mb(pid: int) -> dict[str, float]:
    """RSS and peak RSS (VmHWM) summed over the process tree, in MB."""
    rss = hwm = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError):
            st = proc_status(p)
            rss += st["VmRSS"]
            hwm += st["VmHWM"]
    return {"rss_mb": round(rss / 1024, 1), "peak_mb": round(hwm / 1024, 1)}


def rss_mb(pid: int) -> float:
    return tree_memory_mb(pid)["rss_mb"]


def cpu_seconds(pid: int) -> float:
    """utime + stime (+ reaped children's) of a process tree, all threads, in seconds."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])
    return total / CLK_TCK


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per thread of one process ("main" is the thread whose id is the pid)."""
    out: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
                name = "main" if tid == str(pid) else f"thread-{tid}"
                out[name] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy (not idle/iowait) since boot, from /proc/stat."""
    with open("/proc/stat") as fh:
        vals = [int(x) for x in fh.readline().split()[1:]]
    return (sum(vals[:8]) - vals[3] - vals[4]) / CLK_TCK


class CpuMeter:
    """CPU used over one phase (100% = one core) by the client (this process), the server processes, and by
    everything else on the machine (other users' work competes for the same cores)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0 = time.perf_counter()
        self.client0 = time.process_time()
        self.busy0 = machine_busy_seconds()
        self.start = {k: cpu_seconds(p) for k, p in pids.items()}
        self.threads0 = thread_cpu_seconds(pids["server"]) if "server" in pids else {}

    def result(self, requests: int = 0) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        client = time.process_time() - self.client0
        out = {"wall_s": round(wall, 2), "client_cpu_pct": round(100 * client / wall, 1)}
        ours = client
        for k, p in self.pids.items():
            used = cpu_seconds(p) - self.start[k]
            ours += used
            out[f"{k}_cpu_pct"] = round(100 * used / wall, 1)
            if requests and k == "server":
                out["server_cpu_ms_per_request"] = round(1000 * used / requests, 3)
        if requests:
            out["client_cpu_ms_per_request"] = round(1000 * client / requests, 3)
        out["other_processes_cpu_pct"] = round(max(0.0, 100 * (machine_busy_seconds() - self.busy0 - ours) / wall), 1)
        if self.threads0:  # the server's busiest threads: is one of them (the event loop) saturated?
            now = thread_cpu_seconds(self.pids["server"])
            used = {k: 100 * (v - self.threads0.get(k, 0.0)) / wall for k, v in now.items()}
            out["server_threads_cpu_pct"] = {k: round(v, 1) for k, v in
                                             sorted(used.items(), key=lambda kv: -kv[1])[:4] if v >= 1.0}
        return out


def clean_env() -> dict[str, str]:
    """The inherited environment without any FHIR_OUTREACH_* (the server rejects unknown ones)."""
    return {k: v for k, v in os.environ.items() if not k.upper().startswith("FHIR_OUTREACH_")}


def wait_tcp(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f}s:\n{tail(log)}")


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before /healthz answered:\n{tail(log)}")
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise RuntimeError(f"/healthz not OK after {timeout:.0f}s (last: {last}):\n{tail(log)}")


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Server:
    store: str
    url: str
    token: str
    pid: int
    data_dir: Path
    store_url: str
    extra_pids: dict[str, int] = field(default_factory=dict)


def start_stack(kind: str, procs: Processes, work: Path, args: argparse.Namespace) -> Server:
    env = clean_env()
    extra: dict[str, int] = {}
    if kind == "sqlite":
        store_url = f"sqlite:///{work / 'store.db'}"
    else:
        mport = free_port()
        nx_log = work / "nx-27017.log"
        nx = procs.start("nx-27017", [NX, "--db", "memory", "--host", "127.0.0.1", "-p", str(mport),
                                      "--log-file", str(work / "nx-27017.file.log"),
                                      "--pid-file", str(work / "nx-27017.pid")], env, nx_log)
        wait_tcp(mport, nx, nx_log)
        extra["nx27017"] = nx.pid
        store_url = f"mongodb://127.0.0.1:{mport}/fhir_outreach_bench"
    port = free_port()
    token = secrets.token_urlsafe(24)
    env.update({
        "FHIR_OUTREACH_STORE": store_url,
        "FHIR_OUTREACH_DATA_DIR": str(work),
        "FHIR_OUTREACH_API_TOKENS": token,
        "FHIR_OUTREACH_HOST": "127.0.0.1",
        "FHIR_OUTREACH_PORT": str(port),
        "FHIR_OUTREACH_BASE_URL": f"http://127.0.0.1:{port}/fhir",
        "FHIR_OUTREACH_LOG_LEVEL": "warning",
    })
    if kind == "sqlite" and args.sqlite_synchronous:
        env["FHIR_OUTREACH_SQLITE_SYNCHRONOUS"] = args.sqlite_synchronous
    if args.processes:
        env["FHIR_OUTREACH_PROCESSES"] = str(args.processes)
    log = work / "server.log"
    proc = procs.start("fhir-outreach", [*SERVE, "--host", "127.0.0.1", "--port", str(port)], env, log)
    wait_healthy(f"http://127.0.0.1:{port}/healthz", proc, log)
    return Server(kind, f"http://127.0.0.1:{port}", token, proc.pid, work, store_url, extra)


class Profiler:
    """Optional py-spy recording of the server during chosen phases (``--profile``)."""

    def __init__(self, procs: Processes, server: Server, phases: set[str], out_dir: Path, tag: str) -> None:
        self.procs, self.server, self.phases, self.out_dir, self.tag = procs, server, phases, out_dir, tag
        self.files: dict[str, str] = {}
        self.summaries: dict[str, Any] = {}

    @contextlib.contextmanager
    def phase(self, name: str, label: str = "") -> Iterator[None]:
        if name not in self.phases:
            yield
            return
        key = f"{name}-{label}" if label else name
        pyspy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
        if pyspy is None:
            raise RuntimeError("--profile needs py-spy (/work/venv/bin/pip install py-spy)")
        out = self.out_dir / f"profile-{self.tag}-{self.server.store}-{key}.txt"
        proc = self.procs.start("py-spy", [pyspy, "record", "--pid", str(self.server.pid), "--rate", "200",
                                           "--format", "raw", "--threads", "--output", str(out), "--nonblocking"],
                                os.environ.copy(), out.with_suffix(".log"))
        time.sleep(1.0)  # let it attach
        try:
            yield
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.procs.stop(proc)
            self.procs.procs = [(n, p) for n, p in self.procs.procs if p is not proc]
            if out.exists():
                self.files[key] = str(out)
                self.summaries[key] = summarise_profile(out)


def summarise_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample percentages per function from py-spy's collapsed ('raw') output."""
    self_counts: dict[str, int] = {}
    incl: dict[str, int] = {}
    threads: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        thread = frames[0]
        threads[thread] = threads.get(thread, 0) + count
        names = [_frame_name(f) for f in frames[1:]]
        if names:
            self_counts[names[-1]] = self_counts.get(names[-1], 0) + count
        for name in set(names):
            incl[name] = incl.get(name, 0) + count

    def pct(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"samples": total, "threads": pct(threads), "self": pct(self_counts), "inclusive": pct(incl)}


def _frame_name(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (file.py)", short path; the project's own frames keep
    # their line number (py-spy charges time in C, e.g. sqlite3, to the calling Python line)
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    if "fhir_outreach/" not in where:
        where = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/src/", "/lib/python3.11/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})" if where else name


# --- workload ----------------------------------------------------------------------------------------

class Workload:
    def __init__(self, total: int, seed: int) -> None:
        rng = random.Random(seed)
        self.run = uuid.uuid4().hex[:8]
        self.status = [rng.choice(STATUSES) for _ in range(total)]
        self.code = [rng.randrange(len(CODES)) for _ in range(total)]
        start = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
        self.authored = [(start + dt.timedelta(minutes=rng.randrange(525_600))).strftime("%Y-%m-%dT%H:%M:%SZ")
                         for _ in range(total)]

    def task(self, i: int) -> dict[str, Any]:
        system, code = CODES[self.code[i]]
        return {
            "resourceType": "Task",
            "identifier": [{"system": "urn:fhir-outreach:bench", "value": f"{self.run}-{i}"}],
            "status": self.status[i],
            "intent": "order",
            "priority": "routine",
            "code": {"coding": [{"system": system, "code": code}]},
            "description": "Call the patient about their outreach follow-up",
            "for": {"reference": f"Patient/p{i // TASKS_PER_PATIENT}"},
            "owner": {"reference": f"Practitioner/pr{i % 200}"},
            "authoredOn": self.authored[i],
        }

    def expected(self, patient: int, status: str, upto: int) -> int:
        lo = patient * TASKS_PER_PATIENT
        return sum(1 for i in range(lo, min(lo + TASKS_PER_PATIENT, upto)) if self.status[i] == status)


class RawResponse:
    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status: int, headers: dict[str, str], content: bytes) -> None:
        self.status_code, self.headers, self.content = status, headers, content

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")


class RawClient:
    """``--client raw``: a minimal keep-alive HTTP/1.1 client on asyncio streams (one connection), with the
    same ``get``/``post`` surface the benchmark uses. It spends far less CPU per request than httpx, so on a
    small machine it shows what the server can do when the load generator is not the bottleneck. It speaks
    only what this server answers (Content-Length bodies); anything else is an error."""

    def __init__(self, base_url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.fixed = "".join(f"{k}: {v}\r\n" for k, v in {"Host": f"{self.host}:{self.port}", **headers}.items())
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.last_used = 0.0

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> RawResponse:
        # The server closes idle keep-alive connections (uvicorn: after 5 s), e.g. while a checkpoint runs
        # its sequential searches: reconnect before sending rather than ever retrying a request.
        if self.reader is None or self.reader.at_eof() or time.monotonic() - self.last_used > 1.0:
            await self._close()
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None and self.writer is not None
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        head = f"{method} {path} HTTP/1.1\r\n{self.fixed}{extra}Content-Length: {len(body)}\r\n\r\n"
        self.writer.write(head.encode() + body)
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 120)
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        hdrs = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                hdrs[k.strip().lower()] = v.strip()
        if "content-length" not in hdrs and status not in (204, 304):
            raise RuntimeError(f"--client raw needs Content-Length responses; got headers {hdrs}")
        content = await self.reader.readexactly(int(hdrs.get("content-length", "0")))
        self.last_used = time.monotonic()
        if hdrs.get("connection", "").lower() == "close":
            await self._close()
        return RawResponse(status, hdrs, content)

    async def get(self, path: str, params: dict[str, str] | None = None) -> RawResponse:
        return await self.request("GET", f"{path}?{urlencode(params)}" if params else path)

    async def post(self, path: str, content: bytes, headers: dict[str, str] | None = None) -> RawResponse:
        return await self.request("POST", path, content, headers)


CLIENT_ERRORS = (httpx.HTTPError, OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, RuntimeError)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)

    def q(p: float) -> float:
        return round(s[min(len(s) - 1, int(p * len(s)))] * 1000, 2)

    return {"n": len(s), "p50_ms": q(0.50), "p95_ms": q(0.95), "p99_ms": q(0.99), "max_ms": round(s[-1] * 1000, 2),
            "mean_ms": round(statistics.fmean(s) * 1000, 2)}


class Errors:
    def __init__(self) -> None:
        self.count = 0
        self.samples: list[str] = []

    def add(self, text: str) -> None:
        self.count += 1
        if len(self.samples) < 5:
            self.samples.append(text[:300])


async def run_pool(clients: list[Any], items: list[Any], fn: Any) -> None:
    """Run ``fn(client, item)`` for every item, one request in flight per client (each item once)."""
    it = iter(items)

    async def worker(client: Any) -> None:
        for item in it:
            await fn(client, item)

    await asyncio.gather(*(worker(c) for c in clients))


class Bench:
    def __init__(self, server: Server, args: argparse.Namespace, work: Workload, prof: Profiler) -> None:
        self.s, self.args, self.w, self.prof = server, args, work, prof
        self.ids: list[str | None] = [None] * (args.tasks + args.batch_tasks)
        self.errors = Errors()
        self.rng = random.Random(args.seed + 1)
        self.pids = {"server": server.pid, **server.extra_pids}

    def client(self) -> Any:
        """One keep-alive connection per client: httpx's pool costs more CPU per request the more
        connections one client holds (measured here: 1.3 ms/request at 1 connection, 3.3 ms at 32), so
        each in-flight slot gets its own single-connection client."""
        if self.args.client == "raw":
            return RawClient(self.s.url, {"Authorization": f"Bearer {self.s.token}", "Accept": FHIR_JSON})
        return httpx.AsyncClient(
            base_url=self.s.url, timeout=httpx.Timeout(120.0),
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            headers={"Authorization": f"Bearer {self.s.token}", "Accept": FHIR_JSON})

    def memory(self) -> dict[str, float]:
        out = {"server_rss_mb": rss_mb(self.s.pid)}
        for name, pid in self.s.extra_pids.items():
            out[f"{name}_rss_mb"] = rss_mb(pid)
        return out

    async def creates(self, clients: list[Any], lo: int, hi: int) -> dict[str, Any]:
        lat: list[float] = []
        ok = 0

        async def one(client: Any, i: int) -> None:
            nonlocal ok
            body = orjson.dumps(self.w.task(i))
            t = time.perf_counter()
            try:
                r = await client.post("/fhir/Task", content=body, headers={"Content-Type": FHIR_JSON})
            except CLIENT_ERRORS as exc:
                self.errors.add(f"create {i}: {exc!r}")
                return
            lat.append(time.perf_counter() - t)
            if r.status_code != 201:
                self.errors.add(f"create {i}: {r.status_code} {r.text}")
                return
            self.ids[i] = r.headers["location"].split("/_history/")[0].rsplit("/", 1)[1]
            ok += 1

        cpu = CpuMeter(self.pids)
        t0 = time.perf_counter()
        await run_pool(clients, list(range(lo, hi)), one)
        wall = time.perf_counter() - t0
        return {"from": lo, "to": hi, "created": ok, "seconds": round(wall, 2),
                "creates_per_s": round(ok / wall, 1), "latency": percentiles(lat), "cpu": cpu.result(max(ok, 1))}

    async def batches(self, clients: list[Any], lo: int, hi: int) -> dict[str, Any]:
        size = self.args.batch_size
        chunks = [(a, min(a + size, hi)) for a in range(lo, hi, size)]
        lat: list[float] = []
        created = 0

        async def one(client: Any, chunk: tuple[int, int]) -> None:
            nonlocal created
            a, b = chunk
            bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
                {"request": {"method": "POST", "url": "Task"}, "resource": self.w.task(i)} for i in range(a, b)]}
            t = time.perf_counter()
            try:
                r = await client.post("/fhir", content=orjson.dumps(bundle), headers={"Content-Type": FHIR_JSON})
            except CLIENT_ERRORS as exc:
                self.errors.add(f"batch {a}: {exc!r}")
                return
            lat.append(time.perf_counter() - t)
            if r.status_code != 200:
                self.errors.add(f"batch {a}: {r.status_code} {r.text}")
                return
            for i, entry in zip(range(a, b), orjson.loads(r.content).get("entry", []), strict=False):
                resp = entry.get("response", {})
                if str(resp.get("status", "")).startswith("201"):
                    created += 1
                    self.ids[i] = resp["location"].split("/_history/")[0].rsplit("/", 1)[1]
                else:
                    self.errors.add(f"batch entry {i}: {resp}")

        cpu = CpuMeter(self.pids)
        t0 = time.perf_counter()
        await run_pool(clients[: self.args.batch_concurrency], chunks, one)
        wall = time.perf_counter() - t0
        return {"from": lo, "to": hi, "bundles": len(chunks), "bundle_size": size,
                "bundle_concurrency": self.args.batch_concurrency, "created": created, "seconds": round(wall, 2),
                "creates_per_s": round(created / wall, 1), "bundle_latency": percentiles(lat), "cpu": cpu.result(created)}

    async def reads(self, clients: list[Any], upto: int) -> dict[str, Any]:
        pool = [x for x in self.ids[:upto] if x is not None]
        sample = [self.rng.choice(pool) for _ in range(self.args.reads)]
        lat: list[float] = []
        ok = 0

        async def one(client: Any, rid: str) -> None:
            nonlocal ok
            t = time.perf_counter()
            try:
                r = await client.get(f"/fhir/Task/{rid}")
            except CLIENT_ERRORS as exc:
                self.errors.add(f"read {rid}: {exc!r}")
                return
            lat.append(time.perf_counter() - t)
            if r.status_code != 200:
                self.errors.add(f"read {rid}: {r.status_code} {r.text}")
                return
            ok += 1

        cpu = CpuMeter(self.pids)
        t0 = time.perf_counter()
        await run_pool(clients, sample, one)
        wall = time.perf_counter() - t0
        return {"reads": len(sample), "ok": ok, "seconds": round(wall, 2), "reads_per_s": round(ok / wall, 1),
                "latency": percentiles(lat), "cpu": cpu.result(max(ok, 1))}

    async def searches(self, upto: int, n: int) -> dict[str, Any]:
        """Sequential patient+status searches (one connection, one request at a time)."""
        patients = upto // TASKS_PER_PATIENT  # fully populated patients only
        lat: list[float] = []
        totals: list[int] = []
        checked = mismatches = 0
        async with self.client() as client:
            await client.get("/fhir/Task", params={"patient": "Patient/p0", "status": "requested"})  # warm
            cpu = CpuMeter(self.pids)
            deadline = time.monotonic() + self.args.search_budget
            for k in range(n):
                if time.monotonic() > deadline:
                    break
                p = self.rng.randrange(patients)
                t = time.perf_counter()
                r = await client.get("/fhir/Task", params={"patient": f"Patient/p{p}", "status": "requested"})
                lat.append(time.perf_counter() - t)
                if r.status_code != 200:
                    self.errors.add(f"search p{p}: {r.status_code} {r.text}")
                    continue
                total = orjson.loads(r.content).get("total", -1)
                totals.append(total)
                if k < 50:  # correctness spot check against the generated data
                    checked += 1
                    mismatches += total != self.w.expected(p, "requested", upto)
        return {"store_tasks": upto, "patients": patients, **percentiles(lat),
                "mean_matches": round(statistics.fmean(totals), 1) if totals else 0,
                "spot_checked": checked, "spot_mismatches": mismatches, "cpu": cpu.result(len(lat)),
                "stopped_by_budget": len(lat) < n}

    async def run(self) -> dict[str, Any]:
        n, args = self.args.tasks, self.args
        res: dict[str, Any] = {"memory": {"start": self.memory()}, "create_segments": [], "search": {}}
        self.partial = res  # what was measured before a failure is still reported
        done = 0
        create_seconds = 0.0
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(self.client()) for _ in range(args.concurrency)]
            for frac in CHECKPOINTS:
                target = round(n * frac)
                if target <= done:
                    continue
                label = f"{int(frac * 100)}%"
                with self.prof.phase("creates", f"to{int(frac * 100)}pct"):
                    seg = await self.creates(clients, done, target)
                res["create_segments"].append(seg)
                create_seconds += seg["seconds"]
                done = target
                res["memory"][label] = self.memory()
                with self.prof.phase("search", f"at{int(frac * 100)}pct"):
                    res["search"][label] = await self.searches(done, args.searches)
                log(f"  [{self.s.store}] {done:>7} tasks: {seg['creates_per_s']:.0f} creates/s in segment, "
                    f"search p95 {res['search'][label].get('p95_ms')} ms (n={res['search'][label].get('n')}), "
                    f"server RSS {res['memory'][label]['server_rss_mb']} MB, errors {self.errors.count}")
            created = sum(seg["created"] for seg in res["create_segments"])
            res["creates"] = {"tasks": n, "created": created, "seconds": round(create_seconds, 2),
                              "creates_per_s": round(created / create_seconds, 1), "concurrency": args.concurrency,
                              "client": args.client}
            with self.prof.phase("reads"):
                res["reads"] = await self.reads(clients, n)
            log(f"  [{self.s.store}] reads: {res['reads']['reads_per_s']:.0f}/s")
            if args.batch_tasks:
                with self.prof.phase("batch"):
                    res["batch"] = await self.batches(clients, n, n + args.batch_tasks)
                res["memory"]["after_batch"] = self.memory()
                log(f"  [{self.s.store}] batch: {res['batch']['creates_per_s']:.0f} creates/s "
                    f"({args.batch_tasks} Tasks in Bundles of {args.batch_size})")
        res["memory"]["server_processes"] = len(process_tree(self.s.pid))
        res["memory"]["server_peak_vmhwm_mb"] = tree_memory_mb(self.s.pid)["peak_mb"]
        for name, pid in self.s.extra_pids.items():
            res["memory"][f"{name}_peak_vmhwm_mb"] = tree_memory_mb(pid)["peak_mb"]
        rss = [res["memory"][k]["server_rss_mb"] for k in ("10%", "100%") if k in res["memory"]]
        if len(rss) == 2:
            res["memory"]["growth_10_to_100_mb"] = round(rss[1] - rss[0], 1)
            res["memory"]["growth_10_to_100_pct"] = round(100 * (rss[1] - rss[0]) / rss[0], 1)
        res["errors"] = {"count": self.errors.count, "samples": self.errors.samples}
        return res


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- SQLite query plan ---------------------------------------------------------------------------------

def sqlite_plan(db: Path, base_url: str, patients: int) -> dict[str, Any]:
    """EXPLAIN QUERY PLAN of the SQL the SQLite store runs for the patient+status search, and its median
    time run directly on the database (no HTTP) for 20 random patients.

    The SQL is built with the store's own (private) helpers so it is exactly what the server executes; if
    they change shape, the plan is reported as unavailable rather than guessed."""
    try:
        from fhir_outreach.fhir.search import parse_query
        from fhir_outreach.store import sqlite as st

        q = parse_query("Task", [("patient", "Patient/p1"), ("status", "requested")], strict=True,
                        base_url=base_url, default_count=50, max_count=1000)
    except Exception as exc:  # diagnostics only
        return {"error": f"could not parse the query: {exc!r}"}
    out: dict[str, Any] = {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        try:
            takes_conn = len(inspect.signature(st._where).parameters) > 1  # driver chosen by estimate
            where, args = st._where(q, conn) if takes_conn else st._where(q)
            order, order_args = st._order(q)
        except Exception as exc:  # diagnostics only
            return {"error": f"could not build the store's SQL: {exc!r}"}
        sqls = {"count": (f"SELECT COUNT(*) FROM resources r WHERE {where}", args),
                "page": (f"SELECT r.id, r.version, r.last_updated, r.body FROM resources r WHERE {where} "
                         f"ORDER BY {order} LIMIT ? OFFSET ?", [*args, *order_args, 50, 0])}
        rng = random.Random(7)
        for name, (sql, a) in sqls.items():
            rows = conn.execute("EXPLAIN QUERY PLAN " + sql, a).fetchall()
            times = []
            for _ in range(20):
                args_k = [f"Patient/p{rng.randrange(max(1, patients))}" if x == "Patient/p1" else x for x in a]
                t = time.perf_counter()
                conn.execute(sql, args_k).fetchall()
                times.append(time.perf_counter() - t)
            out[name] = {"sql": sql, "args": a, "plan": [r[3] for r in rows],
                         "direct_median_ms": round(1000 * statistics.median(times), 2)}
        out["table_rows"] = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                             for t in ("resources", "history", "idx")}
        out["db_size_mb"] = round(sum(p.stat().st_size for p in db.parent.glob(db.name + "*")) / 2**20, 1)
    finally:
        conn.close()
    return out


# --- driver --------------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = ""
    with contextlib.suppress(Exception):
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        if subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"], capture_output=True,
                          text=True, timeout=10).stdout.strip():
            commit += "+dirty"
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    load = ""
    with contextlib.suppress(OSError):
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return {"cores": os.cpu_count(), "cpu": model, "memory": mem, "kernel": platform.release(),
            "python": platform.python_version(), "git": commit, "loadavg_at_start": load,
            "note": "client, server, nx-27017 and any other work on the machine share these cores; "
                    "see the cpu figures of each phase"}


def bench_store(kind: str, args: argparse.Namespace, procs: Processes, out_dir: Path, tag: str) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"fhir-outreach-bench-{kind}-"))
    log(f"[{kind}] data dir {work}")
    result: dict[str, Any] = {"store": kind, "data_dir": str(work)}
    server = None
    bench = None
    try:
        server = start_stack(kind, procs, work, args)
        result["store_url"] = server.store_url
        log(f"[{kind}] server pid {server.pid} on {server.url} ({server.store_url})")
        prof = Profiler(procs, server, set(args.profile or []), out_dir, tag)
        workload = Workload(args.tasks + args.batch_tasks, args.seed)
        bench = Bench(server, args, workload, prof)
        result.update(asyncio.run(bench.run()))
        if prof.files:
            result["profiles"] = {"files": prof.files, "summaries": prof.summaries}
    except Exception as exc:
        result["failed"] = f"{type(exc).__name__}: {exc}"
        if bench is not None:
            result.update({k: v for k, v in getattr(bench, "partial", {}).items() if k not in result})
            result["errors"] = {"count": bench.errors.count, "samples": bench.errors.samples}
        exited = [f"{name} (pid {p.pid}) exited with {p.returncode}" for name, p in procs.procs
                  if p.poll() is not None]
        if exited:
            result["failed"] += "; " + ", ".join(exited)
        log(f"[{kind}] FAILED: {result['failed']}")
    except BaseException:  # Ctrl-C / SIGTERM: stop everything, drop the half-filled data dir
        procs.stop_all()
        if not args.keep_data:
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        procs.stop_all()
    if "failed" in result:
        for name in ("server.log", "nx-27017.log", "nx-27017.file.log"):
            if (work / name).exists():
                result[f"log_tail_{name}"] = tail(work / name, 40)
    if kind == "sqlite" and server is not None and (work / "store.db").exists():
        result["query_plan"] = sqlite_plan(work / "store.db", f"{server.url}/fhir", args.tasks // TASKS_PER_PATIENT)
    if args.keep_data or "failed" in result:
        log(f"[{kind}] kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
        result["data_dir"] += " (removed)"
    return result


def verdicts(r: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "creates" in r:
        out["creates_per_s >= 1500"] = r["creates"]["creates_per_s"] >= TARGETS["creates_per_s"]
    full = r.get("search", {}).get("100%")
    if full:
        out["search_p95_ms <= 20 at full N"] = full["p95_ms"] <= TARGETS["search_p95_ms"]
    if "growth_10_to_100_pct" in r.get("memory", {}):
        out["server RSS growth 10%->100% <= 15%"] = r["memory"]["growth_10_to_100_pct"] <= TARGETS["rss_growth_pct"]
    return out


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    rows: list[tuple[str, ...]] = [("", *(r["store"] for r in results))]

    def add(label: str, fn: Any) -> None:
        cells = []
        for r in results:
            try:
                cells.append(str(fn(r)))
            except (KeyError, IndexError, TypeError, ValueError):
                cells.append("-")
        rows.append((label, *cells))

    def cpu(c: dict[str, Any]) -> str:
        text = f"{c['client_cpu_pct']:.0f} / {c['server_cpu_pct']:.0f}"
        text += f" / nx {c['nx27017_cpu_pct']:.0f}" if "nx27017_cpu_pct" in c else ""
        return text + f" / others {c['other_processes_cpu_pct']:.0f}"

    def threads(c: dict[str, Any]) -> str:
        return " ".join(f"{k.removeprefix('thread-')}:{v:.0f}" for k, v in c["server_threads_cpu_pct"].items())

    def per_req(c: dict[str, Any]) -> str:
        return f"{c['server_cpu_ms_per_request']:.2f} / {c['client_cpu_ms_per_request']:.2f}"

    def lat(d: dict[str, Any]) -> str:
        return f"{d['p50_ms']} / {d['p95_ms']} / {d['p99_ms']}"

    add(f"creates/s, single POST (c={args.concurrency})", lambda r: f"{r['creates']['creates_per_s']:.0f}")
    for i, frac in enumerate(CHECKPOINTS):
        add(f"  segment up to {int(frac * 100)}% of N",
            lambda r, i=i: f"{r['create_segments'][i]['creates_per_s']:.0f}")
    add("  create latency p50/p95/p99 ms (last seg.)", lambda r: lat(r["create_segments"][-1]["latency"]))
    add("  CPU% client / server / others (last seg.)", lambda r: cpu(r["create_segments"][-1]["cpu"]))
    add("  CPU ms per create: server / client", lambda r: per_req(r["create_segments"][-1]["cpu"]))
    add("  server threads CPU% (last segment)", lambda r: threads(r["create_segments"][-1]["cpu"]))
    add(f"creates/s, batch Bundles of {args.batch_size} (c={args.batch_concurrency})",
        lambda r: f"{r['batch']['creates_per_s']:.0f}")
    add("  CPU% client / server / others (batch)", lambda r: cpu(r["batch"]["cpu"]))
    add("  CPU ms per create: server / client", lambda r: per_req(r["batch"]["cpu"]))
    add(f"reads/s, GET Task/id (c={args.concurrency})", lambda r: f"{r['reads']['reads_per_s']:.0f}")
    add("  CPU% client / server / others (reads)", lambda r: cpu(r["reads"]["cpu"]))
    add("  CPU ms per read: server / client", lambda r: per_req(r["reads"]["cpu"]))
    for frac in CHECKPOINTS:
        label = f"{int(frac * 100)}%"
        add(f"search p50/p95/p99 ms @{label} of N",
            lambda r, label=label: lat(r["search"][label]) + f" (n={r['search'][label]['n']})")
    add("  mean matches per search @100%", lambda r: r["search"]["100%"]["mean_matches"])
    add("  server CPU ms per search @100%", lambda r: r["search"]["100%"]["cpu"]["server_cpu_ms_per_request"])
    add("server RSS MB at start", lambda r: r["memory"]["start"]["server_rss_mb"])
    for frac in CHECKPOINTS:
        label = f"{int(frac * 100)}%"
        add(f"server RSS MB @{label} of N", lambda r, label=label: r["memory"][label]["server_rss_mb"])
    add("server RSS growth 10% -> 100%", lambda r: f"{r['memory']['growth_10_to_100_pct']}%")
    add("server peak RSS (VmHWM) MB", lambda r: r["memory"]["server_peak_vmhwm_mb"])
    add("nx-27017 peak RSS MB (in-memory db)", lambda r: r["memory"]["nx27017_peak_vmhwm_mb"])
    add("errors", lambda r: r["errors"]["count"])
    for r in results:
        if "failed" in r:
            rows.append((f"FAILED {r['store']}", r["failed"][:300].replace("\n", " ")))
    width = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(width[i]) if i < len(width) else c for i, c in enumerate(row)).rstrip()
                     for row in rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--store", choices=("sqlite", "mongo", "both"), default="sqlite")
    p.add_argument("--tasks", type=int, default=100_000, help="N: Tasks created with single POSTs")
    p.add_argument("--quick", action="store_true", help="smoke run: N=5000, fewer reads and searches")
    p.add_argument("--concurrency", type=int, default=32, help="requests in flight for creates and reads")
    p.add_argument("--client", choices=("httpx", "raw"), default="httpx",
                   help="httpx.AsyncClient (the measurement of record) or a minimal asyncio HTTP/1.1 client "
                        "that uses far less CPU (shows the server's capacity on a small machine)")
    p.add_argument("--batch-fraction", type=float, default=0.1, help="extra Tasks created in batch Bundles, x N")
    p.add_argument("--batch-size", type=int, default=100, help="creates per batch Bundle")
    p.add_argument("--batch-concurrency", type=int, default=4, help="batch Bundles in flight")
    p.add_argument("--reads", type=int, default=5000, help="GET Task/{id} requests")
    p.add_argument("--searches", type=int, default=2000, help="sequential searches at each checkpoint")
    p.add_argument("--search-budget", type=float, default=180.0,
                   help="at most this many seconds of searches per checkpoint (fewer searches if slow)")
    p.add_argument("--sqlite-synchronous", choices=("FULL", "NORMAL"),
                   help="set FHIR_OUTREACH_SQLITE_SYNCHRONOUS (default: the server's default, FULL)")
    p.add_argument("--processes", type=int,
                   help="set FHIR_OUTREACH_PROCESSES (serve processes; default: the server's default)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--profile", nargs="*", choices=("creates", "search", "reads", "batch"),
                   help="record the server with py-spy during these phases (perturbs the figures)")
    p.add_argument("--keep-data", action="store_true", help="keep the temporary data dirs")
    p.add_argument("--out", type=Path, help="results JSON (default bench/results/api-<store>-<time>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.tasks = 5000
        args.reads = min(args.reads, 2000)
        args.searches = min(args.searches, 500)
    if args.tasks < 10 * TASKS_PER_PATIENT:
        p.error(f"--tasks must be at least {10 * TASKS_PER_PATIENT} (10% of N must fill a patient)")
    if not 1 <= args.concurrency <= 256 or not 1 <= args.batch_concurrency <= args.concurrency:
        p.error("--concurrency must be 1..256 and --batch-concurrency 1..concurrency")
    args.batch_tasks = int(args.tasks * args.batch_fraction)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stores = ["sqlite", "mongo"] if args.store == "both" else [args.store]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or HERE / "results" / f"api-{args.store}-{'quick-' if args.quick else ''}{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    procs = Processes()

    def on_term(signum: int, frame: Any) -> None:
        signal.raise_signal(signal.SIGINT)  # handled like Ctrl-C (inside asyncio.run: cancels the run)

    # Ctrl-C must work even when started with SIGINT ignored (e.g. '&' in a non-interactive shell)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_term)
    report: dict[str, Any] = {
        "benchmark": "fhir-outreach API (bench/bench_api.py)", "date": dt.datetime.now(dt.UTC).isoformat(),
        "machine": machine(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets_sqlite": TARGETS, "results": []}
    try:
        for kind in stores:
            result = bench_store(kind, args, procs, out.parent, stamp)
            result["targets_met"] = verdicts(result) if kind == "sqlite" else {}
            report["results"].append(result)
            out.write_text(json.dumps(report, indent=2))
    except KeyboardInterrupt:
        log("interrupted: stopping every process this script started")
        return 130
    finally:
        procs.stop_all()
    print(f"fhir-outreach API benchmark, {report['date'][:19]}Z, {report['machine']['cores']} cores "
          f"({report['machine']['cpu']}), N={args.tasks}, git {report['machine']['git']}, client {args.client}")
    print(f"client, server, nx-27017 and other processes share the cores (CPU%: 100 = one core); load average "
          f"at start {report['machine']['loadavg_at_start']}")
    print(table(report["results"], args))
    for r in report["results"]:
        if r.get("errors", {}).get("count"):
            print(f"WARNING {r['store']}: {r['errors']['count']} failed requests; figures count successes only. "
                  f"First: {r['errors']['samples'][:1]}")
        if r.get("targets_met"):
            print(f"{r['store']} targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}"
                                                      for k, v in r["targets_met"].items()))
        plan = r.get("query_plan", {})
        if "count" in plan:
            print(f"{r['store']} query plan, patient+status page ({plan['page']['direct_median_ms']} ms direct): "
                  + " | ".join(plan["page"]["plan"]))
            print(f"{r['store']} query plan, patient+status count ({plan['count']['direct_median_ms']} ms direct): "
                  + " | ".join(plan["count"]["plan"]))
    print(f"results: {out}")
    return 1 if any("failed" in r or r.get("errors", {}).get("count") for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())

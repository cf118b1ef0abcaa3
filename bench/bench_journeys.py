#!/usr/bin/env python3
"""Journey runtime benchmark: trigger latency, steps/s of one worker, and a million pending waits, per store.

Every phase starts its own stack on 127.0.0.1 with a fresh store: ``fhir-outreach serve`` with
``FHIR_OUTREACH_SERVE_WORKER=false`` (the API only), one ``fhir-outreach worker`` process
(``FHIR_OUTREACH_WORKER_POLL_SECONDS``, default 0.05) and, for MongoDB, ``nx-27017 --db memory`` (a MongoDB
wire-protocol server written in Python on SQLite: *not* mongod). Journeys are loaded through
``POST /admin/journeys?activate=true``.

1. ``latency``: the sample ``patient-discharge`` journey. Setup writes N Patients and N ``in-progress``
   Encounters (batch Bundles) and waits until the worker has handled their events. The measured phase sends
   ``PUT /fhir/Encounter/{id}`` (status ``finished``) open loop: request i goes out at t0 + i/rate whatever
   the earlier ones are doing (one keep-alive connection per in-flight request, a new one when all are busy).
   The first output of trigger i (the portal Communication: the patients have no high-risk Condition) has an
   id the engine derives from the run, so it is known in advance. Latency = (the time an observer process
   first found it in the store) - (client time just before the PUT was written to the socket). The observer
   polls read-only (``read_many``) every ``--observe-interval`` s for the oldest ``--observe-window`` unseen
   outputs of the triggers already sent, and all of them once a second; resolution = interval + query time.
   The output's ``meta.lastUpdated`` is reported as a lower bound (the engine stamps a run's writes with the
   time it began executing the run). All times come from the host's one clock. Outputs missing
   ``--drain-limit`` s after the last send count as unfinished. ``--inprocess`` runs the engine inside serve.
2. ``steps``: the bench-only journey ``bench/journey_steps.yaml`` (branch -> portal message -> branch ->
   task -> end, five instant steps per run). N runs are put in the store before the worker starts, either as
   ``run`` records already enrolled and due (``--enrol runs``: pure step execution) or as ``event`` records
   like the local change feed writes (``--enrol events``: the worker also matches and enrols). Steps/s =
   path entries of all run records / (last run's end stamp - first step stamp).
3. ``waits``: ``bench/journey_waits.yaml`` (wait -> end). Run records in state ``waiting`` are written through
   the store's own record API in bulk (SQLite: concurrent ``add_record`` calls, which the store's writer
   thread inserts in groups; MongoDB: ``insert_many`` of the store's own record documents). For each level
   (default 10k, 100k, 1M pending waits) the worker is restarted, its idle CPU and RSS are sampled, then a
   sample of runs falls due over ``--wait-window`` seconds and lateness = (stamp of the step executed after
   the wait) - due. The pending waits are due beyond the window (spread over ``--wait-horizon-days``), not
   within ~60 s: a million firings in 60 s would need ~17,000 runs/s from one worker, so lateness would then
   measure the backlog, not the timer.

It prints a table per phase and writes JSON (``--out``, default ``bench/results/journeys-<stores>-<time>.json``).
Every process it starts is stopped by pid on exit, error, Ctrl-C or SIGTERM. It runs against a copy of ``src/``
taken at start (others edit the working tree meanwhile; ``--no-snapshot`` to run the tree as it is).

    /work/venv/bin/python bench/bench_journeys.py --quick                       # smoke, both stores
    /work/venv/bin/python bench/bench_journeys.py --store sqlite --phases latency --rate 200,100,20
    /work/venv/bin/python bench/bench_journeys.py --store mongo --phases steps --enrol runs --profile
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))


def _snapshot_sources() -> None:
    """Run against a copy of ``src/`` taken now: other people edit the working tree while a benchmark runs,
    and serve and the worker (started minutes apart) must run the same code. Re-executes this script with
    ``PYTHONPATH`` naming the copy (it wins over the editable install's path entry); children inherit it."""
    if os.environ.get("BENCH_JOURNEYS_SRC") or "--no-snapshot" in sys.argv or sys.argv[1:2] == ["_observe"]:
        return
    snap = Path(tempfile.mkdtemp(prefix="bench-journeys-src-"))
    shutil.copytree(REPO / "src", snap / "src", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "BENCH_JOURNEYS_SRC": str(snap / "src"),
           "PYTHONPATH": os.pathsep.join([str(snap / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


if __name__ == "__main__":  # not when imported
    _snapshot_sources()
from bench_api import (  # noqa: E402
    BIN,
    NX,
    Processes,
    RawClient,
    clean_env,
    cpu_seconds,
    free_port,
    machine_busy_seconds,
    proc_status,
    summarise_profile,
    tail,
    wait_healthy,
    wait_tcp,
)

from fhir_outreach.journeys import steps as journey_steps  # noqa: E402
from fhir_outreach.store import open_store  # noqa: E402
from fhir_outreach.store.base import Record  # noqa: E402

FHIR_JSON = "application/fhir+json"
DISCHARGE = REPO / "profiles" / "journeys" / "patient-discharge.yaml"
STEPS_JOURNEY = HERE / "journey_steps.yaml"
WAITS_JOURNEY = HERE / "journey_waits.yaml"
JOURNEY_BASE = "http://fhir-outreach.org/journeys/"
TARGETS = {"trigger_p99_ms": 500.0, "steps_per_s": 1000.0, "lateness_p99_s": 2.0}
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


# --- small helpers ------------------------------------------------------------------------------------

def pct(values: list[float], scale: float = 1000.0, digits: int = 1) -> dict[str, Any]:
    """n, p50, p90, p99, max and mean of ``values`` (seconds), scaled (default: to ms). ``inf`` stands for
    "not finished within the time limit": a percentile that falls on one is reported as None."""
    if not values:
        return {"n": 0}
    s = sorted(values)
    finite = [v for v in s if v != float("inf")]

    def q(p: float) -> float | None:
        v = s[min(len(s) - 1, int(p * len(s)))]
        return None if v == float("inf") else round(v * scale, digits)

    return {"n": len(s), "unfinished": len(s) - len(finite), "p50": q(0.50), "p90": q(0.90), "p99": q(0.99),
            "max": q(1.0), "mean": round(statistics.fmean(finite) * scale, digits) if finite else None}


def show(v: Any, limit: float | None = None) -> str:
    if v is None:
        return f">{limit:.0f}s" if limit else "-"
    return str(v)


def rss_mb(pid: int) -> dict[str, float]:
    try:
        st = proc_status(pid)
    except OSError:
        return {"rss_mb": 0.0, "peak_mb": 0.0}
    return {"rss_mb": round(st["VmRSS"] / 1024, 1), "peak_mb": round(st["VmHWM"] / 1024, 1)}


def other_heavy_processes() -> list[str]:
    """Test suites and benchmarks of other sessions running now (they compete for the 2 cores)."""
    out = []
    me = {os.getpid(), os.getppid()}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in me:
            continue
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if ("pytest" in cmd or "bench_" in cmd) and "bench_journeys" not in cmd:
                out.append(f"{entry}: {cmd[:160]}")
    return out


class Cpu:
    """CPU% (100 = one core) of named processes over a window, plus everything else on the machine."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0 = time.perf_counter()
        self.me0 = time.process_time()
        self.busy0 = machine_busy_seconds()
        self.start = {k: cpu_seconds(p) for k, p in pids.items()}

    def result(self) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        out: dict[str, float] = {"wall_s": round(wall, 2)}
        ours = time.process_time() - self.me0
        out["bench_client_cpu_pct"] = round(100 * ours / wall, 1)
        for k, p in self.pids.items():
            used = cpu_seconds(p) - self.start[k]
            ours += used
            out[f"{k}_cpu_pct"] = round(100 * used / wall, 1)
        out["others_cpu_pct"] = round(max(0.0, 100 * (machine_busy_seconds() - self.busy0 - ours) / wall), 1)
        return out


# --- the stack ----------------------------------------------------------------------------------------

@dataclass
class Stack:
    kind: str
    work: Path
    procs: Processes
    args: argparse.Namespace
    store_url: str = ""
    base: str = ""
    token: str = "bench-journeys-token-0123456789"
    serve: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    nx: subprocess.Popen[bytes] | None = None
    worker_starts: int = 0
    notes: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = clean_env()
        env.update({"FHIR_OUTREACH_STORE": self.store_url, "FHIR_OUTREACH_DATA_DIR": str(self.work),
                    "FHIR_OUTREACH_API_TOKENS": self.token, "FHIR_OUTREACH_LOG_LEVEL": "warning",
                    "FHIR_OUTREACH_BASE_URL": f"{self.base}/fhir",
                    "FHIR_OUTREACH_SERVE_WORKER": "true" if self.args.inprocess else "false",
                    "FHIR_OUTREACH_WORKER_POLL_SECONDS": str(self.args.poll)})
        if self.kind == "sqlite" and self.args.sqlite_synchronous:
            env["FHIR_OUTREACH_SQLITE_SYNCHRONOUS"] = self.args.sqlite_synchronous
        return env

    def start(self) -> None:
        if self.kind == "sqlite":
            self.store_url = f"sqlite:///{self.work / 'store.db'}"
        else:
            port = free_port()
            log = self.work / "nx-27017.log"
            self.nx = self.procs.start("nx-27017", [NX, "--db", "memory", "--host", "127.0.0.1", "-p", str(port),
                                                    "--log-file", str(self.work / "nx-27017.file.log"),
                                                    "--pid-file", str(self.work / "nx-27017.pid")], clean_env(), log)
            wait_tcp(port, self.nx, log)
            self.store_url = f"mongodb://127.0.0.1:{port}/bench_journeys"
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        log = self.work / "serve.log"
        self.serve = self.procs.start("serve", [str(BIN / "fhir-outreach"), "serve", "--host", "127.0.0.1", "--port",
                                                str(port)], self.env(), log)
        wait_healthy(f"{self.base}/healthz", self.serve, log)

    def start_worker(self) -> subprocess.Popen[bytes]:
        if self.args.inprocess:  # --inprocess: serve runs the engine itself; no worker process
            assert self.serve is not None
            return self.serve
        self.worker_starts += 1
        log = self.work / f"worker-{self.worker_starts}.log"
        self.worker = self.procs.start("worker", [str(BIN / "fhir-outreach"), "worker"], self.env(), log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # it prints one line once it has reached the store
            if self.worker.poll() is not None:
                raise RuntimeError(f"worker exited with {self.worker.returncode}:\n{tail(log)}")
            if "waiting for work" in tail(log):
                return self.worker
            time.sleep(0.05)
        raise RuntimeError(f"worker did not start:\n{tail(log)}")

    def check_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is not None:
            raise RuntimeError(f"worker exited with {self.worker.returncode}:\n"
                               f"{tail(self.work / f'worker-{self.worker_starts}.log')}")

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.procs.stop(self.worker)
            self.worker = None

    def pids(self) -> dict[str, int]:
        out = {}
        if self.serve is not None:
            out["serve"] = self.serve.pid
        if self.worker is not None and self.worker is not self.serve:
            out["worker"] = self.worker.pid
        if self.nx is not None:
            out["nx27017"] = self.nx.pid
        return out

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=120, headers={"Authorization": f"Bearer {self.token}"})

    def load_journey(self, path: Path) -> str:
        with self.http() as http:
            r = http.post("/admin/journeys", params={"activate": "true"}, content=path.read_bytes(),
                          headers={"Content-Type": "application/yaml"})
        if r.status_code != 201:
            raise RuntimeError(f"loading {path.name}: {r.status_code} {r.text}")
        return str(r.json()["journey"])


@contextlib.asynccontextmanager
async def bench_store(stack: Stack) -> Any:
    """The same store, opened in this process (bulk inserts before the worker starts, reading results)."""
    store = open_store(stack.store_url, base_url=f"{stack.base}/fhir")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def run_count(store: Any, kind: str = "run") -> dict[str, int]:
    out: dict[str, int] = {}
    for (_, state), n in (await store.count_records(kind)).items():
        out[state] = out.get(state, 0) + n
    return out


async def wait_until(check: Callable[[], Awaitable[bool]], limit_s: float, every: float, stack: Stack,
                     what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        stack.check_worker()
        if await check():
            return time.monotonic() - t0
        await asyncio.sleep(every)
    raise RuntimeError(f"timed out after {limit_s:.0f} s waiting for {what}")


async def all_records(store: Any, kind: str, state: str | None = None, page: int = 1000) -> list[Record]:
    out: list[Record] = []
    while True:
        got = await store.list_records(kind, state=state, limit=page, offset=len(out))
        out += got
        if len(got) < page:
            return out


async def bulk_add(store: Any, records: Iterator[Record], now: float, chunk: int = 5000) -> int:
    """Insert records through the store's own record API, in bulk (see the module docstring)."""
    n = 0
    mongo = hasattr(store, "_records")
    buf: list[Record] = []

    async def flush() -> None:
        nonlocal n
        if not buf:
            return
        if mongo:
            from fhir_outreach.store.mongo import _record_doc

            await store._records.insert_many([_record_doc(r, created=now, updated=now, rev=1) for r in buf],
                                             ordered=False)
        else:
            await asyncio.gather(*(store.add_record(r, now=now) for r in buf))
        n += len(buf)
        buf.clear()

    for rec in records:
        buf.append(rec)
        if len(buf) >= chunk:
            await flush()
    await flush()
    return n


def encounter(i: int, status: str, prefix: str = "be") -> dict[str, Any]:
    enc: dict[str, Any] = {"resourceType": "Encounter", "id": f"{prefix}{i}", "status": status,
                           "class": {"system": ACT, "code": "IMP"}, "subject": {"reference": f"Patient/{prefix}p{i}"},
                           "period": {"start": "2026-02-27T09:00:00Z"}}
    if status == "finished":
        enc["period"] = {"start": "2026-02-27T09:00:00Z", "end": "2026-03-01T08:00:00Z"}
        enc["hospitalization"] = {"dischargeDisposition": {"coding": [{"code": "home"}]}}
    return enc


def patient(i: int, prefix: str = "be") -> dict[str, Any]:
    return {"resourceType": "Patient", "id": f"{prefix}p{i}", "name": [{"given": [f"Bench{i}"], "family": "Patient"}]}


# --- the observer: a separate process that sees each trigger's first output appear ----------------------

async def _observe(spec: dict[str, Any]) -> dict[str, Any]:
    """Poll the store (read-only, ``read_many``) for the expected outputs: each poll asks for the oldest
    ``window`` not yet seen among the triggers already sent (the schedule is open loop, so "sent" is known
    from t0 and the rate); every ``sweep`` seconds it asks for all of them (outputs that overtook others).
    Records when each was first seen (the time after the answer came back) and how long polls took."""
    ids = [tuple(x.split("/", 1)) for x in spec["ids"]]
    store = open_store(spec["store_url"], base_url=spec["base_url"])
    await store.open()
    await asyncio.to_thread(Path(spec["ready"]).write_text, "ready")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    seen: dict[int, tuple[float, str]] = {}
    unseen = list(range(len(ids)))
    query_s: list[float] = []
    polls = 0
    next_sweep = time.monotonic() + spec["sweep"]
    try:
        while unseen and not stop.is_set():
            sent = int((time.time() - spec["t0"]) * spec["rate"]) + 2
            how = "window"
            if time.monotonic() >= next_sweep:
                cand, how = [i for i in unseen if i < sent], "sweep"
                next_sweep = time.monotonic() + spec["sweep"]
            else:
                cand = [i for i in unseen[: spec["window"]] if i < sent]
            found: set[str] = set()
            for a in range(0, len(cand), 500):
                t = time.monotonic()
                found |= {f"{r.type}/{r.id}" for r in await store.read_many([ids[i] for i in cand[a:a + 500]])}
                query_s.append(time.monotonic() - t)
            now = time.time()
            if found:
                for i in cand:
                    if f"{ids[i][0]}/{ids[i][1]}" in found:
                        seen[i] = (now, how)
                unseen = [i for i in unseen if i not in seen]
            polls += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), spec["interval"])
    finally:
        await store.close()
    return {"seen": {str(i): v for i, v in seen.items()}, "polls": polls, "query_ms": pct(query_s),
            "cpu_s": round(time.process_time(), 2)}


def observe_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = asyncio.run(_observe(spec))
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


def start_observer(stack: Stack, ids: list[str], t0: float, rate: float) -> tuple[subprocess.Popen[bytes], Path]:
    args = stack.args
    interval = args.observe_interval or (0.01 if stack.kind == "sqlite" else 0.02)
    spec_path = stack.work / "observer.json"
    out = stack.work / "observed.json"
    ready = stack.work / "observer.ready"
    spec_path.write_text(json.dumps({"ids": ids, "t0": t0, "rate": rate, "interval": interval,
                                     "window": args.observe_window, "sweep": 1.0, "store_url": stack.store_url,
                                     "base_url": f"{stack.base}/fhir", "out": str(out), "ready": str(ready)}))
    proc = stack.procs.start("observer", [sys.executable, str(Path(__file__).resolve()), "_observe", str(spec_path)],
                             os.environ.copy(), stack.work / "observer.log")
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the observer did not start:\n{tail(stack.work / 'observer.log')}")
        time.sleep(0.05)
    return proc, out


def stop_observer(stack: Stack, proc: subprocess.Popen[bytes], out: Path) -> dict[str, Any]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
    stack.procs.stop(proc)
    if not out.exists():
        raise RuntimeError(f"the observer wrote nothing:\n{tail(stack.work / 'observer.log')}")
    return dict(json.loads(out.read_text()))


# --- 1. trigger latency -------------------------------------------------------------------------------

async def open_loop(stack: Stack, bodies: list[tuple[str, bytes]], rate: float,
                    t0_wall: float | None = None) -> dict[str, Any]:
    """Send every request at its scheduled time (t0 + i/rate) on an idle keep-alive connection (a new one
    when none is idle); never wait for a response before sending the next. Returns per-request times."""
    headers = {"Authorization": f"Bearer {stack.token}", "Accept": FHIR_JSON}
    idle: list[RawClient] = []
    opened = 0
    n = len(bodies)
    sent = [0.0] * n
    answered = [0.0] * n
    status = [0] * n
    lag: list[float] = []
    errors: list[str] = []

    async def one(i: int, client: RawClient) -> None:
        path, body = bodies[i]
        sent[i] = time.time()
        try:
            r = await client.request("PUT", path, body, {"Content-Type": FHIR_JSON, "Prefer": "return=minimal"})
            status[i] = r.status_code
            if r.status_code not in (200, 201) and len(errors) < 5:
                errors.append(f"{path}: {r.status_code} {r.text[:200]}")
        except Exception as exc:  # counted, reported; the schedule goes on
            if len(errors) < 5:
                errors.append(f"{path}: {exc!r}")
            await client._close()
        answered[i] = time.time()
        idle.append(client)

    tasks = []
    t0 = time.monotonic() + (max(0.0, t0_wall - time.time()) if t0_wall is not None else 0.2)
    for i in range(n):
        target = t0 + i / rate
        delay = target - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        lag.append(max(0.0, time.monotonic() - target))
        if idle:
            client = idle.pop()
        else:
            client = RawClient(stack.base, headers)
            opened += 1
        tasks.append(asyncio.create_task(one(i, client)))
    send_seconds = time.monotonic() - t0
    await asyncio.gather(*tasks)
    for c in idle:
        await c._close()
    return {"sent": sent, "answered": answered, "status": status, "send_seconds": send_seconds,
            "schedule_lag": lag, "connections": opened, "errors": errors}


def put_bundle(http: httpx.Client, resources: list[dict[str, Any]]) -> None:
    for a in range(0, len(resources), 100):
        bundle = {"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": r, "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"}}
            for r in resources[a:a + 100]]}
        r = http.post("/fhir", content=orjson.dumps(bundle), headers={"Content-Type": FHIR_JSON})
        if r.status_code != 200:
            raise RuntimeError(f"setup bundle: {r.status_code} {r.text[:300]}")
        bad = [e["response"] for e in r.json().get("entry", []) if not str(e["response"]["status"]).startswith("20")]
        if bad:
            raise RuntimeError(f"setup bundle entries failed: {bad[:3]}")


def events_idle(stack: Stack, expected: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        with stack.http() as http:
            rows = http.get("/admin/counts").json().get("events", [])
        total = sum(r["count"] for r in rows)
        pending = sum(r["count"] for r in rows if r["state"] != "done")
        return total >= expected and pending == 0
    return check


async def phase_latency(stack: Stack) -> dict[str, Any]:
    args = stack.args
    n = int(args.rate * args.duration)
    warm = args.warmup
    canonical = stack.load_journey(DISCHARGE)
    engine = stack.start_worker()  # the worker process (or serve itself with --inprocess)
    t = time.monotonic()
    with stack.http() as http:
        put_bundle(http, [patient(i, "bw") for i in range(warm)] + [patient(i) for i in range(n)])
        put_bundle(http, [encounter(i, "in-progress", "bw") for i in range(warm)] +
                   [encounter(i, "in-progress") for i in range(n)])
    setup_s = time.monotonic() - t
    await wait_until(events_idle(stack, n + warm), 600, 0.5, stack, "the setup events")
    # warm-up: a few discharges at a low rate, not measured (first FHIRPath compiles, catalog load, ...)
    warm_bodies = [(f"/fhir/Encounter/bw{i}", orjson.dumps(encounter(i, "finished", "bw"))) for i in range(warm)]
    await open_loop(stack, warm_bodies, 20.0)
    await wait_until(events_idle(stack, n + 2 * warm), 120, 0.5, stack, "the warm-up events")
    async with bench_store(stack) as store:
        await wait_until(lambda: _runs_at_least(store, warm), 120, 0.5, stack, "the warm-up runs")
    await asyncio.sleep(1.0)

    # The first output of trigger i is known in advance: the portal Communication of its run (the patients
    # have no high-risk Condition), with the id the engine derives from the run and the step's visit.
    expected = []
    for i in range(n):
        run_id = journey_steps.derived_id(f"run|{canonical}|Patient/bep{i}|be{i}|1")
        expected.append(f"Communication/{journey_steps.derived_id(f'{run_id}/portal/1')}")
    bodies = [(f"/fhir/Encounter/be{i}", orjson.dumps(encounter(i, "finished"))) for i in range(n)]
    rss0 = rss_mb(engine.pid)
    t0_wall = time.time() + 3.0
    observer, observed_file = start_observer(stack, expected, t0_wall, args.rate)
    cpu = Cpu({**stack.pids(), "observer": observer.pid})
    profs = []
    if args.profile:
        secs = min(args.profile_seconds, args.duration)
        for who, pid in stack.pids().items():
            profs.append(start_profile(stack, pid, secs, f"latency{args.rate:.0f}-{who}-"))
    res = await open_loop(stack, bodies, args.rate, t0_wall)
    send_cpu = cpu.result()
    print(f"  sent {n} at {args.rate:.0f}/s; waiting for the outputs (at most {args.drain_limit:.0f} s)", flush=True)
    async with bench_store(stack) as store:
        t_drain = time.monotonic()
        progress: list[tuple[float, int]] = []
        while time.monotonic() - t_drain < args.drain_limit:
            stack.check_worker()
            counts = await run_count(store)
            progress.append((round(time.monotonic() - t_drain, 1), sum(v for k, v in counts.items()
                                                                          if k in ("awaiting", "done"))))
            if progress[-1][1] >= warm + n and not counts.get("pending"):
                break
            await asyncio.sleep(0.5)
        drain = time.monotonic() - t_drain
        await asyncio.sleep(1.5)  # the observer's last sweep
        total_cpu = cpu.result()
        observed = stop_observer(stack, observer, observed_file)
        runs = await all_records(store, "run")
        events = await all_records(store, "event")
        outputs = [str(o) for r in runs for o in (r.data.get("outputs") or [])[:1]]
        stored = {f"{s.type}/{s.id}": s for a in range(0, len(outputs), 500)
                  for s in await store.read_many([tuple(o.split("/")) for o in outputs[a:a + 500]])}  # type: ignore[misc]

    event_by_focus = {str(e.data.get("focus")): e for e in events if str(e.data.get("version")) == "2"}
    run_by_focus = {str(r.data.get("focus")): r for r in runs}
    seen = observed["seen"]
    obs, stamp, http_lat, to_event, to_run = [], [], [], [], []
    missing = by_sweep = wrong_output = 0
    inf = float("inf")
    for i in range(n):
        sent = res["sent"][i]
        if res["status"][i] in (200, 201):
            http_lat.append(res["answered"][i] - sent)
        run = run_by_focus.get(f"Encounter/be{i}")
        outs = (run.data.get("outputs") or []) if run else []
        stored_out = stored.get(outs[0]) if outs else None
        if stored_out is not None and outs[0] != expected[i]:
            wrong_output += 1  # the id derivation changed: the observer watched the wrong resource
        if str(i) in seen:
            obs.append(seen[str(i)][0] - sent)
            by_sweep += seen[str(i)][1] == "sweep"
        else:
            obs.append(inf)
        if run is None or stored_out is None:
            missing += 1
            stamp.append(inf)
            continue
        stamp.append(stored_out.last_updated.timestamp() - sent)
        ev = event_by_focus.get(f"Encounter/be{i}")
        if ev is not None:
            to_event.append(float(ev.data.get("received") or 0) - sent)
        to_run.append(float(run.data.get("started") or 0) - sent)
    ok = sum(1 for st in res["status"] if st in (200, 201))
    first, last = min(res["sent"]), max(res["sent"])
    starts = sorted(float(r.data["path"][0]["at"]) for r in runs
                    if r.data.get("path") and str(r.data.get("focus", "")).startswith("Encounter/be"))
    out = {
        "triggers": n, "rate_target": args.rate, "duration_s": args.duration, "warmup": warm,
        "achieved_rate": round((n - 1) / (last - first), 1) if n > 1 else 0.0,
        "put_ok": ok, "put_errors": res["errors"], "connections_opened": res["connections"],
        "schedule_lag_ms": pct(res["schedule_lag"]),
        "latency_ms": pct(obs), "latency_stamp_ms": pct(stamp), "put_response_ms": pct(http_lat),
        "send_to_event_ms": pct(to_event), "send_to_run_started_ms": pct(to_run),
        "measured": n - missing, "unfinished": missing, "drain_after_send_s": round(drain, 1),
        "drain_limit_s": args.drain_limit, "outputs_after_send": progress[::max(1, len(progress) // 40)],
        "observer": {"polls": observed["polls"], "query_ms": observed["query_ms"], "cpu_s": observed["cpu_s"],
                     "seen": len(seen), "seen_by_sweep": by_sweep, "wrong_output_ids": wrong_output,
                     "interval_s": args.observe_interval or (0.01 if stack.kind == "sqlite" else 0.02),
                     "window": args.observe_window},
        "worker_runs_per_s": round((len(starts) - 1) / (starts[-1] - starts[0]), 1) if len(starts) > 1 else 0.0,
        "setup_s": round(setup_s, 1), "cpu_during_send": send_cpu, "cpu_until_drained": total_cpu,
        "engine_rss_mb": {"before": rss0, "after": rss_mb(engine.pid)}, "inprocess": bool(args.inprocess),
        "method": "observed: first time a poll of the store (read_many, every interval) found the trigger's "
                  "Communication, minus the client's send time; stamp: its meta.lastUpdated (lower bound)",
    }
    finish_profiles(profs, out, 30)
    p99 = out["latency_ms"].get("p99")
    out["target_met"] = p99 is not None and p99 <= TARGETS["trigger_p99_ms"] and not wrong_output
    return out


async def _runs_at_least(store: Any, n: int, with_output: bool = False) -> bool:
    counts = await run_count(store)
    if not with_output:
        return sum(counts.values()) >= n and not counts.get("pending")
    # the discharge journey's runs await the portal message after writing it
    return sum(v for k, v in counts.items() if k in ("awaiting", "done")) >= n and not counts.get("pending")


# --- 2. steps per second ------------------------------------------------------------------------------

def step_runs(canonical: str, n: int, now: float) -> Iterator[Record]:
    """Run records exactly as ``Engine.enrol`` writes them (plus their member records), due now."""
    url, _, version = canonical.partition("|")
    for i in range(n):
        pat, enc = f"Patient/bep{i}", encounter(i, "finished")
        key = f"{url}|{pat}|be{i}"
        run_id = journey_steps.derived_id(f"run|{canonical}|{pat}|be{i}|1")
        yield Record("member", key, state="active", group=pat, data={
            "journey": url, "entries": 1, "event": f"bench|{i}", "started": now, "run": run_id})
        yield Record("run", run_id, state="pending", group=canonical, due=now, data={
            "journey": url, "version": version, "canonical": canonical, "patient": pat, "binding": f"be{i}",
            "member": key, "event_key": f"bench|{i}", "source": "local", "focus": f"Encounter/be{i}",
            "interaction": "update", "current": enc, "previous": None, "event": None, "step": "inpatient",
            "status": "active", "path": [], "outputs": [], "started": now})


def step_events(n: int, now: float) -> Iterator[Record]:
    """Event records exactly as the local change feed writes them for an Encounter update."""
    for i in range(n):
        enc = encounter(i, "finished")
        enc["meta"] = {"versionId": "2", "lastUpdated": "2026-03-01T08:00:00.000Z"}
        prev = {**encounter(i, "in-progress"), "meta": {"versionId": "1", "lastUpdated": "2026-02-27T09:00:00.000Z"}}
        focus = f"Encounter/be{i}"
        yield Record("event", f"local|{focus}|v2|live", group="local", due=0.0, data={
            "source": "local", "hook": None, "subscription": None, "topic": None, "shape": "local",
            "interaction": "update", "focus": focus, "version": "2", "resource": enc, "previous": prev,
            "patient": f"Patient/bep{i}", "received": now})


def start_profile(stack: Stack, pid: int, seconds: float, tag: str) -> tuple[subprocess.Popen[bytes], Path]:
    """py-spy (collapsed stacks, per thread) of one process for ``seconds``; with ``--profile-idle`` waiting
    threads are sampled too (where a latency-bound process waits)."""
    pyspy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if pyspy is None:
        raise RuntimeError("--profile needs py-spy (/work/venv/bin/pip install py-spy)")
    out = stack.args.results / f"profile-journeys-{stack.kind}-{tag}-{stack.args.stamp}.txt"
    argv = [pyspy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--threads", "--nonblocking",
            "--duration", str(int(seconds)), "--output", str(out)]
    if stack.args.profile_idle:
        argv.append("--idle")
    proc = stack.procs.start("py-spy", argv, os.environ.copy(), out.with_suffix(".log"))
    return proc, out


def finish_profiles(profs: list[tuple[subprocess.Popen[bytes], Path]], out: dict[str, Any], wait_s: float) -> None:
    for proc, path in profs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait_s)
        if path.exists():
            who = next((w for w in ("nx27017", "serve", "worker") if f"-{w}-" in path.name), "worker")
            out[f"profile_{who}_file"] = str(path)
            out[f"profile_{who}"] = summarise_profile(path, top=30)


async def phase_steps(stack: Stack, mode: str) -> dict[str, Any]:
    args = stack.args
    n = args.runs
    canonical = stack.load_journey(STEPS_JOURNEY)
    now = time.time()
    t = time.monotonic()
    async with bench_store(stack) as store:
        if mode == "runs":
            inserted = await bulk_add(store, step_runs(canonical, n, now), now)
        else:
            inserted = await bulk_add(store, step_events(n, now), now)
    insert_s = time.monotonic() - t
    worker = stack.start_worker()
    cpu = Cpu(stack.pids())
    rss_samples: list[float] = []
    prof: list[tuple[subprocess.Popen[bytes], Path]] | None = None
    series: list[tuple[float, int]] = []
    t_start = time.monotonic()
    async with bench_store(stack) as store:
        async def done() -> bool:
            rss_samples.append(rss_mb(worker.pid)["rss_mb"])
            counts = await run_count(store)
            series.append((round(time.monotonic() - t_start, 1), counts.get("done", 0)))
            return counts.get("done", 0) >= n or time.monotonic() - t_start > args.steps_limit

        if args.profile:
            await asyncio.sleep(3.0)
            prof = [start_profile(stack, worker.pid, args.profile_seconds, f"steps-{mode}-worker-")]
            if stack.nx is not None:
                prof.append(start_profile(stack, stack.nx.pid, args.profile_seconds, f"steps-{mode}-nx27017-"))
        wall = await wait_until(done, args.steps_limit + 60, 2.0, stack, f"{n} runs to finish")
        used = cpu.result()
        stack.stop_worker()
        runs = await all_records(store, "run")
    ats = [float(e["at"]) for r in runs for e in r.data.get("path") or []]
    first, last = min(ats), max([*ats, *(float(r.data["ended"]) for r in runs if r.data.get("ended"))])
    steps_total = len(ats)
    finished = sum(1 for r in runs if r.state == "done")
    steps_finished = sum(len(r.data.get("path") or []) for r in runs if r.state == "done")
    statuses: dict[str, int] = {}
    for r in runs:
        statuses[str(r.data.get("status"))] = statuses.get(str(r.data.get("status")), 0) + 1
    span = last - first
    out: dict[str, Any] = {
        "mode": mode, "runs": n, "runs_finished": finished, "stopped_by_limit": finished < n,
        "done_over_time": series[::max(1, len(series) // 40)], "records_inserted": inserted,
        "insert_s": round(insert_s, 1),
        "steps": steps_total, "steps_per_run": round(steps_finished / max(1, finished), 2), "run_status": statuses,
        "span_s": round(span, 2), "steps_per_s": round(steps_total / span, 1) if span > 0 else 0.0,
        "runs_per_s": round(finished / span, 1) if span > 0 else 0.0,
        "ms_per_step": round(1000 * span / max(1, steps_total), 3),
        "wall_from_worker_start_s": round(wall, 1), "cpu": used,
        "worker_rss_mb_max_sampled": max(rss_samples or [0.0]),
    }
    if len(series) > 10:  # early and late rate: does it slow down as the store grows?
        k = len(series) // 4
        (t0, d0), (t1, d1) = series[0], series[k]
        (t2, d2), (t3, d3) = series[-k - 1], series[-1]
        out["runs_per_s_first_quarter"] = round((d1 - d0) / max(t1 - t0, 1e-6), 1)
        out["runs_per_s_last_quarter"] = round((d3 - d2) / max(t3 - t2, 1e-6), 1)
    if used.get("worker_cpu_pct"):
        out["worker_cpu_ms_per_step"] = round(10 * used["worker_cpu_pct"] * used["wall_s"] / max(1, steps_total), 3)
    finish_profiles(prof or [], out, args.profile_seconds + 30)
    out["target_met"] = out["steps_per_s"] >= TARGETS["steps_per_s"]
    return out


# --- 3. pending waits ---------------------------------------------------------------------------------

def wait_runs(canonical: str, lo: int, hi: int, due: Callable[[int], float], now: float,
              prefix: str = "w") -> Iterator[Record]:
    """Runs paused in the journey's wait step, as the engine leaves them (state ``waiting``, ``next``)."""
    url, _, version = canonical.partition("|")
    for i in range(lo, hi):
        pat = f"Patient/{prefix}p{i}"
        enc = {"resourceType": "Encounter", "id": f"{prefix}{i}", "status": "planned",
               "class": {"system": ACT, "code": "AMB"}, "subject": {"reference": pat},
               "period": {"start": "2026-03-01T08:00:00Z"}}
        yield Record("run", journey_steps.derived_id(f"run|{canonical}|{pat}|{prefix}{i}|1"), state="waiting",
                     group=canonical, due=due(i), data={
                         "journey": url, "version": version, "canonical": canonical, "patient": pat,
                         "binding": f"{prefix}{i}", "member": f"{url}|{pat}|{prefix}{i}", "event_key": f"bench|{i}",
                         "source": "local", "focus": f"Encounter/{prefix}{i}", "interaction": "create",
                         "current": enc, "previous": None, "event": None, "step": "pause", "status": "active",
                         "path": [{"seq": 0, "step": "pause", "kind": "wait", "title": "pause", "at": now,
                                   "note": "wait P30D"}],
                         "outputs": [], "started": now, "next": "end"})


async def wait_level(stack: Stack, canonical: str, level: int, have: int, base: float, horizon: float,
                     done_levels: int) -> dict[str, Any]:
    """Top the pending waits up to ``level``, restart the worker, sample it idle, then fire a sample."""
    args = stack.args
    span = max(1, max(args.wait_levels))
    now = time.time()
    t = time.monotonic()
    async with bench_store(stack) as store:  # the pending waits: due after the window, spread over the horizon
        await bulk_add(store, wait_runs(canonical, have, level, lambda i: base + 86400.0 + horizon * i / span, now),
                       now)
    insert_s = time.monotonic() - t
    worker = stack.start_worker()
    await asyncio.sleep(2.0)
    idle_cpu = Cpu({"worker": worker.pid, **({"nx27017": stack.nx.pid} if stack.nx else {})})
    await asyncio.sleep(args.idle_seconds)
    idle = idle_cpu.result()
    rss_idle = rss_mb(worker.pid)
    # the sample: due evenly over the window, starting a little after it is written
    s = args.wait_sample
    t_due0 = time.time() + 3.0
    sample = list(wait_runs(canonical, 0, s, lambda i: t_due0 + args.wait_window * i / s, time.time(),
                            f"s{level}-"))
    dues = {rec.key: rec.due for rec in sample}
    rss_series: list[float] = []
    async with bench_store(stack) as store:
        await bulk_add(store, iter(sample), time.time())
        cpu = Cpu(stack.pids())

        async def fired() -> bool:
            rss_series.append(rss_mb(worker.pid)["rss_mb"])
            if time.time() < t_due0 + args.wait_window:
                return False
            return (await run_count(store)).get("done", 0) >= s * (done_levels + 1)

        await wait_until(fired, args.wait_window + 600, 1.0, stack, "the sample's firings")
        fire_cpu = cpu.result()
        late: list[float] = []
        for rec in await asyncio.gather(*(store.get_record("run", k) for k in dues)):
            if rec is None or rec.state != "done" or len(rec.data.get("path") or []) < 2:
                continue
            late.append(float(rec.data["path"][1]["at"]) - dues[rec.key])
        states = await run_count(store)
    row: dict[str, Any] = {
        "pending_waits": level, "insert_s": round(insert_s, 1), "worker_idle": {**idle, **rss_idle},
        "worker_rss_mb_while_firing_max": max(rss_series or [0.0]), "worker_rss_mb_after": rss_mb(worker.pid),
        "cpu_while_firing": fire_cpu, "fired": len(late), "lateness_s": pct(late, scale=1.0, digits=3),
        "run_states": states}
    if stack.nx is not None:
        row["nx27017_rss_mb"] = rss_mb(stack.nx.pid)["rss_mb"]
    if stack.kind == "sqlite":
        with contextlib.suppress(OSError):
            row["store_mb"] = round(sum(p.stat().st_size for p in stack.work.glob("store.db*")) / 2 ** 20, 1)
    if args.profile and level == max(args.wait_levels):
        prof = start_profile(stack, worker.pid, 10, f"waits-idle-{level}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            prof[0].wait(40)
        if prof[1].exists():
            row["idle_profile_file"] = str(prof[1])
            row["idle_profile"] = summarise_profile(prof[1], top=20)
    stack.stop_worker()
    return row


async def phase_waits(stack: Stack) -> dict[str, Any]:
    args = stack.args
    canonical = stack.load_journey(WAITS_JOURNEY)
    levels = sorted(args.wait_levels)
    horizon = args.wait_horizon_days * 86400.0
    out: dict[str, Any] = {"levels": [], "sample_per_level": args.wait_sample, "window_s": args.wait_window,
                           "horizon_days": args.wait_horizon_days}
    have = 0
    base = time.time()
    for level in levels:
        row = await wait_level(stack, canonical, level, have, base, horizon, len(out["levels"]))
        row["insert_per_s"] = round((level - have) / max(row["insert_s"], 1e-6))
        have = level
        out["levels"].append(row)
        print(f"  {stack.kind} waits @{level:,}: insert {row['insert_s']:.0f} s, idle worker CPU "
              f"{row['worker_idle'].get('worker_cpu_pct')}%, RSS {row['worker_idle']['rss_mb']} MB, lateness "
              f"p50/p99 {row['lateness_s'].get('p50')}/{row['lateness_s'].get('p99')} s", flush=True)
    rss = [lv["worker_idle"]["rss_mb"] for lv in out["levels"]]
    out["rss_growth_pct_first_to_last"] = round(100 * (rss[-1] - rss[0]) / rss[0], 1) if rss and rss[0] else None
    last = out["levels"][-1] if out["levels"] else {}
    out["target_met"] = bool(last) and last["lateness_s"].get("p99", 1e9) <= TARGETS["lateness_p99_s"] and \
        last["fired"] == args.wait_sample
    return out


# --- driver -------------------------------------------------------------------------------------------

PHASES = {"latency": phase_latency, "waits": phase_waits}


async def run_phase(kind: str, phase: str, args: argparse.Namespace, procs: Processes) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"bench-journeys-{kind}-{phase}-"))
    stack = Stack(kind, work, procs, args)
    ok = False
    try:
        stack.start()
        others = other_heavy_processes()
        t = time.monotonic()
        if phase.startswith("steps"):
            result = await phase_steps(stack, phase.split(":", 1)[1])
        elif phase.startswith("latency@"):
            args.rate = float(phase.split("@", 1)[1])
            result = await phase_latency(stack)
        else:
            result = await PHASES[phase](stack)
        result["phase_seconds"] = round(time.monotonic() - t, 1)
        result["other_heavy_processes_at_start"] = others
        ok = True
        return result
    finally:
        for _, p in reversed(list(procs.procs)):
            procs.stop(p)
        if ok and not args.keep_data:
            shutil.rmtree(work, ignore_errors=True)
        elif not ok:
            print(f"  (data kept in {work})", file=sys.stderr)


def summary(results: dict[str, Any]) -> None:
    print("\nfhir-outreach journeys, 1 worker (nx-27017 is a MongoDB wire-protocol server in Python, not mongod)")
    for kind, phases in results["stores"].items():
        print(f"\n== {kind} ==")
        for key, lat in phases.items():
            if not key.startswith("latency") or "error" in lat:
                continue
            lim = lat["drain_limit_s"]
            print(f"trigger latency @ {lat['rate_target']:.0f}/s for {lat['duration_s']:.0f} s: achieved "
                  f"{lat['achieved_rate']}/s; {lat['measured']}/{lat['triggers']} triggers had their output within "
                  f"{lim:.0f} s of the last send (drained after {lat['drain_after_send_s']} s)")
            print(f"  {'ms':<34} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}")
            for label, k in (("send -> first output (observed)", "latency_ms"),
                             ("send -> output lastUpdated (lower)", "latency_stamp_ms"),
                             ("PUT response", "put_response_ms"), ("send -> event stored", "send_to_event_ms"),
                             ("send -> run enrolled", "send_to_run_started_ms")):
                v = lat[k]
                print(f"  {label:<34} " + " ".join(f"{show(v.get(q), lim):>8}" for q in ("p50", "p90", "p99", "max")))
            ob = lat["observer"]
            print(f"  observer: poll every {ob['interval_s'] * 1000:.0f} ms, query p50 {ob['query_ms'].get('p50')} ms; "
                  f"{ob['seen']} seen ({ob['seen_by_sweep']} only by a 1 s sweep); schedule lag p99 "
                  f"{lat['schedule_lag_ms'].get('p99')} ms")
            c = lat["cpu_during_send"]
            print(f"  worker throughput {lat['worker_runs_per_s']} runs/s; "
                  f"CPU% during send: serve {c.get('serve_cpu_pct')} worker {c.get('worker_cpu_pct')} "
                  f"observer {c.get('observer_cpu_pct')} "
                  f"nx {c.get('nx27017_cpu_pct', '-')} bench {c['bench_client_cpu_pct']} others {c['others_cpu_pct']};"
                  f" target p99 <= {TARGETS['trigger_p99_ms']:.0f} ms: {'met' if lat['target_met'] else 'MISSED'}")
        for key, st in phases.items():
            if not key.startswith("steps") or "error" in st:
                continue
            c = st["cpu"]
            print(f"steps/s ({st['mode']}): {st['steps_per_s']} steps/s = {st['runs_per_s']} runs/s x "
                  f"{st['steps_per_run']} steps, {st['runs_finished']}/{st['runs']} runs in {st['span_s']} s "
                  f"(runs/s first/last quarter {st.get('runs_per_s_first_quarter')}/"
                  f"{st.get('runs_per_s_last_quarter')}); worker CPU "
                  f"{c.get('worker_cpu_pct')}% ({st.get('worker_cpu_ms_per_step')} ms/step), nx "
                  f"{c.get('nx27017_cpu_pct', '-')}%, others {c['others_cpu_pct']}%; target >= "
                  f"{TARGETS['steps_per_s']:.0f}: {'met' if st['target_met'] else 'MISSED'}")
        w = phases.get("waits")
        if w and "error" not in w:
            print(f"pending waits (sample {w['sample_per_level']} due over {w['window_s']} s per level):")
            print(f"  {'pending':>9} {'insert/s':>9} {'idle CPU%':>9} {'RSS MB':>7} {'peak MB':>8} "
                  f"{'late p50 s':>10} {'p99 s':>7} {'max s':>7} {'fired':>6}")
            for lv in w["levels"]:
                lt = lv["lateness_s"]
                print(f"  {lv['pending_waits']:>9,} {lv['insert_per_s']:>9,} {lv['worker_idle'].get('worker_cpu_pct'):>9}"
                      f" {lv['worker_idle']['rss_mb']:>7} {lv['worker_rss_mb_after']['peak_mb']:>8} "
                      f"{lt.get('p50', '-'):>10} {lt.get('p99', '-'):>7} {lt.get('max', '-'):>7} {lv['fired']:>6}")
            print(f"  RSS growth first -> last level: {w['rss_growth_pct_first_to_last']}%; lateness p99 <= "
                  f"{TARGETS['lateness_p99_s']} s at the largest level: {'met' if w['target_met'] else 'MISSED'}")
        for key, st in phases.items():
            if isinstance(st, dict) and "error" in st:
                print(f"{key}: ERROR {st['error']}")


def main() -> int:
    if sys.argv[1:2] == ["_observe"]:
        return observe_main(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", choices=["sqlite", "mongo", "both"], default="both")
    parser.add_argument("--phases", default="latency,steps,waits",
                        help="comma list of latency, steps, waits")
    parser.add_argument("--enrol", default="runs,events", help="steps phase: runs and/or events (comma list)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--poll", type=float, default=0.05, help="FHIR_OUTREACH_WORKER_POLL_SECONDS")
    parser.add_argument("--rate", default="200", help="triggers per second (a comma list: one phase per rate)")
    parser.add_argument("--mongo-rate", default=None, help="rates for MongoDB (default: --rate)")
    parser.add_argument("--drain-limit", type=float, default=300.0,
                        help="latency: wait at most this long after the last send for the outputs")
    parser.add_argument("--steps-limit", type=float, default=600.0,
                        help="steps: stop after this long even if runs remain (steps/s is then over what ran)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of triggers")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured discharges before the measurement")
    parser.add_argument("--runs", type=int, default=20000, help="steps phase: runs pre-loaded")
    parser.add_argument("--wait-levels", default="10000,100000,1000000", help="pending waits per level")
    parser.add_argument("--mongo-wait-levels", default=None, help="levels for MongoDB (default: --wait-levels)")
    parser.add_argument("--wait-sample", type=int, default=3000, help="sample runs due in each level's window")
    parser.add_argument("--wait-window", type=float, default=60.0, help="seconds the sample's due times span")
    parser.add_argument("--wait-horizon-days", type=float, default=30.0, help="the pending waits are due over this")
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="idle worker sampled this long per level")
    parser.add_argument("--profile", action="store_true", help="py-spy the worker (steps; idle at the top level)")
    parser.add_argument("--profile-seconds", type=float, default=20.0)
    parser.add_argument("--profile-idle", action="store_true", help="py-spy --idle: sample waiting threads too")
    parser.add_argument("--sqlite-synchronous", choices=["FULL", "NORMAL"], default=None,
                        help="FHIR_OUTREACH_SQLITE_SYNCHRONOUS for serve and worker (default: the server's, FULL)")
    parser.add_argument("--inprocess", action="store_true",
                        help="latency only: serve runs the engine (FHIR_OUTREACH_SERVE_WORKER=true), no worker process")
    parser.add_argument("--no-snapshot", action="store_true",
                        help="run the working tree's src/ as it is (default: a copy taken at start)")
    parser.add_argument("--observe-interval", type=float, default=None,
                        help="latency: seconds between observer polls (default 0.01 SQLite, 0.02 MongoDB)")
    parser.add_argument("--observe-window", type=int, default=100,
                        help="latency: the observer polls the oldest this many unseen outputs each time")
    parser.add_argument("--keep-data", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.duration, args.runs, args.wait_sample, args.wait_window = 5.0, 2000, 300, 10.0
        args.wait_levels = "1000,10000"
        args.drain_limit, args.steps_limit = 60.0, 60.0
        args.mongo_wait_levels = None
    args.stamp = time.strftime("%Y%m%d-%H%M%S")
    args.results = HERE / "results"
    args.results.mkdir(parents=True, exist_ok=True)
    stores = ["sqlite", "mongo"] if args.store == "both" else [args.store]
    def phases_for(kind: str) -> list[str]:
        phases: list[str] = []
        for p in args.phases.split(","):
            if p == "steps":
                phases += [f"steps:{m}" for m in args.enrol.split(",")]
            elif p == "latency":
                rates = args.mongo_rate if kind == "mongo" and args.mongo_rate else args.rate
                phases += [f"latency@{r}" for r in rates.split(",")]
            elif p in PHASES:
                phases.append(p)
            else:
                parser.error(f"unknown phase {p!r}")
        return phases

    for kind in stores:
        phases_for(kind)
    out_path = Path(args.out) if args.out else args.results / f"journeys-{args.store}-{args.stamp}.json"
    others = other_heavy_processes()
    if others:
        print("WARNING: other heavy processes are running (figures will be disturbed):\n  " + "\n  ".join(others))
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "code": _code_version(), "machine": _machine(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets": TARGETS, "other_heavy_processes_at_start": others, "stores": {},
        "note": "nx-27017 is a MongoDB wire-protocol server written in Python on SQLite, not mongod",
    }
    procs = Processes()

    def on_term(signum: int, frame: Any) -> None:
        procs.stop_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    failed = False
    try:
        for kind in stores:
            results["stores"][kind] = {}
            for phase in phases_for(kind):
                a = argparse.Namespace(**vars(args))
                levels = args.mongo_wait_levels if kind == "mongo" and args.mongo_wait_levels else args.wait_levels
                a.wait_levels = [int(x) for x in str(levels).split(",")]
                print(f"[{time.strftime('%H:%M:%S')}] {kind}: {phase} ...", flush=True)
                try:
                    results["stores"][kind][phase] = asyncio.run(run_phase(kind, phase, a, procs))
                except Exception as exc:
                    failed = True
                    results["stores"][kind][phase] = {"error": f"{type(exc).__name__}: {exc}"}
                    print(f"  {kind} {phase} failed: {exc}", file=sys.stderr)
                out_path.write_text(json.dumps(results, indent=2))
    finally:
        procs.stop_all()
        snap = os.environ.get("BENCH_JOURNEYS_SRC")
        if snap and Path(snap).parent.name.startswith("bench-journeys-src-"):
            shutil.rmtree(Path(snap).parent, ignore_errors=True)
    summary(results)
    print(f"\nJSON: {out_path}")
    return 1 if failed else 0


def _code_version() -> dict[str, Any]:
    """What code ran: HEAD, the source files that differed from it, and a hash of the copy that ran."""
    import hashlib

    import fhir_outreach

    out: dict[str, Any] = {"fhir_outreach": str(Path(fhir_outreach.__file__).parent)}
    with contextlib.suppress(Exception):
        out["head"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True, check=True).stdout.strip()
        out["dirty_src"] = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"],
                                          capture_output=True, text=True, check=True).stdout.split("\n")[:-1]
    src = Path(fhir_outreach.__file__).parent
    digest = hashlib.sha256()
    for f in sorted(src.rglob("*.py")):
        digest.update(f.relative_to(src).as_posix().encode() + f.read_bytes())
    out["src_sha256"] = digest.hexdigest()[:16]
    out["snapshot"] = bool(os.environ.get("BENCH_JOURNEYS_SRC"))
    return out


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "note": "client, server, worker and nx-27017 on the same host"}


if __name__ == "__main__":
    sys.exit(main())

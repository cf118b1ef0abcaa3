#!/usr/bin/env python3
"""Channel delivery benchmark: messages/s through the outbox to local sinks, per channel, consent checks on.

Every phase starts its own stack on 127.0.0.1 with a fresh store (SQLite file, or ``nx-27017 --db memory``:
a MongoDB wire-protocol server written in Python on SQLite, *not* mongod) and one ``fhir-outreach worker``
process (``FHIR_OUTREACH_WORKER_POLL_SECONDS``, default 0.05). The data is written through the store's own
API from this process before the worker starts; the worker then drains it and the figure is taken from the
time stamps it wrote.

1. ``sms``: the generic JSON SMS provider (``FHIR_OUTREACH_SMS_PROVIDER=webhook``). N Communications in
   ``preparation`` (medium sms, category ``reminder``: transactional) and their ``delivery`` records, exactly
   as a journey message step writes them; N Patients with a mobile number. Consent enforcement is on
   (``consent_transactional`` non-restrictive, the default), and every Patient has an active Consent that
   the check must read and evaluate: an email opt-out (it does not apply to SMS), and ``--deny`` of them
   (default 300) an SMS deny as well (half of them an ``OPTOUT`` like a STOP reply records, half a plain
   deny of TREAT by SMS), so those messages end ``not-done`` with reason ``opted-out`` / ``consent``.
   Quiet hours are empty (``FHIR_OUTREACH_QUIET_HOURS=``) so nothing is held, caps and
   ``channel_rate_per_second`` are set far above the load (the default 50/s per channel and worker is a
   provider rate limit and would be the figure otherwise). The sink is a bare ASGI app under uvicorn in its
   own process (this file, ``sink`` sub-command): it checks ``X-Outreach-Signature``, the E.164 ``to`` and
   the ``text`` like the provider contract says, and answers 202 ``{"message_id", "status"}``; it counts
   what it accepted and any id it saw twice.
   Messages/s = finished delivery records / (last ``finished`` stamp - first ``finished`` stamp); the wall
   rate from the worker's start is reported too. ``--mode inprocess`` runs ``Delivery.run_once`` in a loop
   in this process instead of the worker: the delivery pipeline alone, without the worker's journey engine
   (which also handles the ``event`` record every ``sent`` writes). ``--uvloop`` runs this process's event
   loop on uvloop: a what-if, as ``fhir-outreach worker`` runs on the default asyncio loop.
2. ``portal``: a one-step journey (below: one portal message with a Liquid text in the patient's language,
   category ``reminder``). A portal message is complete when the message step writes it: there is no
   delivery record. N ``event`` records exactly as the local change feed writes them
   for an Encounter going ``finished`` (``--enrol events``: the worker matches, enrols and runs) or the run
   records already enrolled (``--enrol runs``: step execution only). ``--deny`` Patients have an active
   Consent denying portal messages; the phase reports how many of them still got theirs (an ``in-progress``
   Communication) and how many were blocked (``not-done`` with a reason).
   Messages/s = portal Communications written / (last run stamp - first run stamp).

It prints a table and writes JSON (``--out``, default ``bench/results/channels-<store>-<time>.json``). Every
process it starts is stopped by pid on exit, error, Ctrl-C or SIGTERM.

    /work/venv/bin/python bench/bench_channels.py --quick                       # smoke, both stores
    /work/venv/bin/python bench/bench_channels.py --store sqlite --messages 5000
    /work/venv/bin/python bench/bench_channels.py --store sqlite --phases sms --profile
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TARGET = 1000.0  # messages/s on one worker, portal and SMS-webhook (issue 5)
SECRET = "bench-sms-webhook-secret-0123456789"
SENDER = "+15005550006"
CHANNEL = "http://fhir-outreach.org/CodeSystem/channel"
CATEGORY = "http://fhir-outreach.org/CodeSystem/message-category"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
AREAS = (617, 415, 212, 312, 206, 303, 512, 702, 808, 907)
STATES = ("MA", "CA", "NY", "IL", "WA", "CO", "TX", "NV", "HI", "AK")

PORTAL_JOURNEY = """\
# Bench-only journey (bench/bench_channels.py, portal messages/s): one portal message, then the end.
journey: bench-portal
version: 1.0.0
title: Bench, one portal message
status: active
description: Benchmark journey for bench/bench_channels.py; every run writes one portal message.
trigger: {type: Encounter, on: [create, update], when: "%current.status = 'finished'"}
reentry: always
binding: "%current.id"
templates:
  bench-portal-note:
    kind: message
    medium: portal
    category: "'reminder'"
    title: "'Your follow-up appointment'"
    vars: {first: "%patient.name.first().given.first()"}
    text:
      en: "Hi {{ first | default: 'there' }}, please book your follow-up appointment in the patient portal."
      es: "Hola {{ first | default: '' }}, reserve su cita de seguimiento en el portal del paciente."
steps:
  - {id: note, title: Portal reminder, message: bench-portal-note, next: end}
  - {id: end, end: true}
"""


# --- the SMS sink (its own process) ------------------------------------------------------------------

def sink_app(secret: str) -> Any:
    """A bare ASGI generic-JSON SMS provider: signed POST in, 202 ``{"message_id", "status"}`` out."""
    import orjson

    key = secret.encode()
    e164 = re.compile(rb"^\+[1-9]\d{1,14}$")
    seen: set[str] = set()
    stats = {"accepted": 0, "duplicates": 0, "bad_signature": 0, "invalid": 0, "first": 0.0, "last": 0.0}

    async def reply(send: Any, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "GET":
            if scope["path"] == "/stats":
                await reply(send, 200, orjson.dumps(stats))
            else:
                await reply(send, 200, b'{"ok":true}')
            return
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        given = next((v for k, v in scope["headers"] if k == b"x-outreach-signature"), b"")
        expected = b"sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(given, expected):
            stats["bad_signature"] += 1
            await reply(send, 401, b'{"error":"bad signature"}')
            return
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict) or not payload.get("id") or not payload.get("text") \
                or not e164.match(str(payload.get("to")).encode()):
            stats["invalid"] += 1
            await reply(send, 422, b'{"error":"id, to (E.164) and text are required"}')
            return
        mid = str(payload["id"])
        if mid in seen:
            stats["duplicates"] += 1
        else:
            seen.add(mid)
            stats["accepted"] += 1
        now = time.time()
        stats["first"] = stats["first"] or now
        stats["last"] = now
        await reply(send, 202, orjson.dumps({"message_id": f"wh-{mid}", "status": "accepted"}))

    return app


def run_sink(argv: list[str]) -> int:
    import uvicorn

    p = argparse.ArgumentParser(prog="bench_channels.py sink")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--secret", default=SECRET)
    a = p.parse_args(argv)
    uvicorn.run(sink_app(a.secret), host="127.0.0.1", port=a.port, loop="uvloop", http="httptools",
                lifespan="off", access_log=False, log_level="warning")
    return 0


# --- helpers -----------------------------------------------------------------------------------------

sys.path.insert(0, str(HERE))


def _bench_api() -> Any:
    import bench_api

    return bench_api


def pct(values: list[float], scale: float = 1000.0) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    s = sorted(values)
    return {"n": len(s), **{f"p{int(q * 100)}": round(s[min(len(s) - 1, int(q * len(s)))] * scale, 2)
                            for q in (0.5, 0.9, 0.99)}, "max": round(s[-1] * scale, 2)}


def tally(values: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def other_heavy_processes() -> list[str]:
    """Test suites and benchmarks of other sessions running now (they compete for the 2 cores)."""
    out = []
    me = {os.getpid(), os.getppid()}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in me:
            continue
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            cmd = b" ".join(argv).decode(errors="replace")
            if Path(argv[0].decode(errors="replace")).name in ("bash", "sh", "timeout", "nohup"):
                continue  # a wrapper or a script waiting for its turn: the process it starts is counted
            if ("pytest" in cmd or "bench_" in cmd) and "bench_channels" not in cmd:
                out.append(f"{entry}: {cmd[:160]}")
    return out


def rss_mb(pid: int) -> float:
    try:
        return round(_bench_api().proc_status(pid)["VmRSS"] / 1024, 1)
    except OSError:
        return 0.0


class Cpu:
    """CPU% (100 = one core) of named processes over a window, this process, and everything else."""

    def __init__(self, pids: dict[str, int]) -> None:
        api = _bench_api()
        self.api = api
        self.pids = pids
        self.t0 = time.perf_counter()
        self.me0 = time.process_time()
        self.busy0 = api.machine_busy_seconds()
        self.start = {k: api.cpu_seconds(p) for k, p in pids.items()}

    def result(self, messages: int = 0) -> dict[str, float]:
        wall = time.perf_counter() - self.t0
        out: dict[str, float] = {"wall_s": round(wall, 2)}
        ours = time.process_time() - self.me0
        out["bench_cpu_pct"] = round(100 * ours / wall, 1)
        for k, p in self.pids.items():
            used = self.api.cpu_seconds(p) - self.start[k]
            ours += used
            out[f"{k}_cpu_pct"] = round(100 * used / wall, 1)
            if messages:
                out[f"{k}_cpu_ms_per_message"] = round(1000 * used / messages, 3)
        if messages and "worker" not in self.pids:  # in-process: the pipeline runs in this process
            out["bench_cpu_ms_per_message"] = round(1000 * (time.process_time() - self.me0) / messages, 3)
        out["others_cpu_pct"] = round(max(0.0, 100 * (self.api.machine_busy_seconds() - self.busy0 - ours) / wall), 1)
        return out


# --- data ----------------------------------------------------------------------------------------------

def number(i: int) -> str:
    return f"({AREAS[(i // 10000) % len(AREAS)]}) 555-{i % 10000:04d}"


def patient(i: int, prefix: str) -> dict[str, Any]:
    res: dict[str, Any] = {
        "resourceType": "Patient", "id": f"{prefix}{i}", "active": True,
        "name": [{"given": [f"Bench{i}"], "family": "Patient"}],
        "telecom": [{"system": "email", "value": f"bench{i}@example.org", "rank": 2},
                    {"system": "phone", "use": "mobile", "value": number(i), "rank": 1}],
        "address": [{"use": "home", "state": STATES[i % len(STATES)], "country": "US"}],
        "communication": [{"language": {"coding": [{"system": "urn:ietf:bcp:47",
                                                    "code": "es" if i % 5 == 0 else "en"}]}, "preferred": True}]}
    return res


def consents(i: int, prefix: str, channel: str, deny: str | None, at: float) -> list[dict[str, Any]]:
    """Every patient: an email opt-out (read and evaluated, does not apply to ``channel``). ``deny``: also a
    deny for ``channel``: ``optout`` = an OPTOUT Consent like a STOP reply records, ``consent`` = a permit
    Consent with a nested deny of TREAT (transactional) by ``channel``."""
    from fhir_outreach.channels.optout import opt_out_consent

    pref = f"Patient/{prefix}{i}"
    out = [opt_out_consent(pref, "email", at - 86400, "bench (email unsubscribe)")]
    if deny == "optout":
        out.append(opt_out_consent(pref, channel, at - 3600, "bench (STOP)"))
    elif deny == "consent":
        out.append({
            "resourceType": "Consent", "id": f"bench-deny-{prefix}{i}", "status": "active",
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                  "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": pref},
            "policyRule": {"coding": [{"system": ACT, "code": "OPTIN"}]},
            "provision": {"type": "permit", "provision": [{
                "type": "deny",
                "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}],
                "code": [{"coding": [{"system": CHANNEL, "code": channel}]}]}]}})
    return out


def sms_communication(i: int, prefix: str) -> dict[str, Any]:
    """What ``steps.run_message`` writes for an SMS message (status ``preparation``)."""
    from fhir_outreach.journeys.definition import IDENTIFIER_SYSTEM
    from fhir_outreach.journeys.steps import derived_id

    run = derived_id(f"bench-run|{prefix}{i}")
    return {"resourceType": "Communication", "id": derived_id(f"{run}/sms/0"),
            "identifier": [{"system": IDENTIFIER_SYSTEM, "value": f"{run}/sms/0"}],
            "instantiatesCanonical": ["http://fhir-outreach.org/templates/bench-sms|1.0.0"],
            "basedOn": [{"reference": f"RequestGroup/{run}"}], "status": "preparation",
            "medium": [{"coding": [{"system": CHANNEL, "code": "sms"}]}],
            "subject": {"reference": f"Patient/{prefix}{i}"}, "recipient": [{"reference": f"Patient/{prefix}{i}"}],
            "category": [{"coding": [{"system": CATEGORY, "code": "reminder"}]}],
            "topic": {"text": "Your follow-up appointment"},
            "payload": [{"contentString": f"Hi Bench{i}, your follow-up appointment is tomorrow at 10:00. "
                                          "Reply YES to confirm."}],
            "language": "en"}


def delivery_record(comm: dict[str, Any], now: float) -> Any:
    """What ``RunContext.hand_to_channel`` adds for a non-portal message."""
    from fhir_outreach.store.base import Record

    ref = f"Communication/{comm['id']}"
    run = comm["basedOn"][0]["reference"].split("/")[1]
    return Record("delivery", ref, group="sms", due=now, data={"communication": ref, "medium": "sms", "run": run,
                                                               "created": now, "source": "local"})


def encounter(i: int, prefix: str, status: str) -> dict[str, Any]:
    enc: dict[str, Any] = {"resourceType": "Encounter", "id": f"{prefix}e{i}", "status": status,
                           "class": {"system": ACT, "code": "AMB"}, "subject": {"reference": f"Patient/{prefix}{i}"},
                           "period": {"start": "2026-03-01T09:00:00Z"}}
    if status == "finished":
        enc["period"] = {"start": "2026-03-01T09:00:00Z", "end": "2026-03-01T09:30:00Z"}
    return enc


def portal_event(i: int, prefix: str, now: float) -> Any:
    """An event record exactly as the local change feed writes it for an Encounter update."""
    from fhir_outreach.store.base import Record

    enc = {**encounter(i, prefix, "finished"), "meta": {"versionId": "2", "lastUpdated": "2026-03-01T09:30:00.000Z"}}
    prev = {**encounter(i, prefix, "in-progress"),
            "meta": {"versionId": "1", "lastUpdated": "2026-03-01T09:00:00.000Z"}}
    focus = f"Encounter/{prefix}e{i}"
    return Record("event", f"local|{focus}|v2|live", group="local", due=0.0, data={
        "source": "local", "hook": None, "subscription": None, "topic": None, "shape": "local",
        "interaction": "update", "focus": focus, "version": "2", "resource": enc, "previous": prev,
        "patient": f"Patient/{prefix}{i}", "received": now})


def portal_run(canonical: str, i: int, prefix: str, now: float) -> Iterator[Any]:
    """The member and run records exactly as ``Engine.enrol`` writes them, due now."""
    from fhir_outreach.journeys.steps import derived_id
    from fhir_outreach.store.base import Record

    url, _, version = canonical.partition("|")
    pat, enc = f"Patient/{prefix}{i}", encounter(i, prefix, "finished")
    binding = f"{prefix}e{i}"
    key = f"{url}|{pat}|{binding}"
    run_id = derived_id(f"run|{canonical}|{pat}|{binding}|1")
    yield Record("member", key, state="active", group=pat, data={
        "journey": url, "entries": 1, "event": f"bench|{i}", "started": now, "run": run_id})
    yield Record("run", run_id, state="pending", group=canonical, due=now, data={
        "journey": url, "version": version, "canonical": canonical, "patient": pat, "binding": binding,
        "member": key, "event_key": f"bench|{i}", "source": "local", "focus": f"Encounter/{prefix}e{i}",
        "interaction": "update", "current": enc, "previous": None, "event": None, "step": "note",
        "status": "active", "path": [], "outputs": [], "started": now})


# --- the stack -------------------------------------------------------------------------------------------

@dataclass
class Stack:
    kind: str
    work: Path
    procs: Any
    args: argparse.Namespace
    store_url: str = ""
    sink_url: str = ""
    sink: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    nx: subprocess.Popen[bytes] | None = None
    notes: list[str] = field(default_factory=list)

    def settings(self) -> dict[str, str]:
        """The channel settings of the run (environment names without the prefix)."""
        s = {"STORE": self.store_url, "DATA_DIR": str(self.work), "LOG_LEVEL": "warning",
             "BASE_URL": "http://127.0.0.1:9/fhir", "WORKER_POLL_SECONDS": str(self.args.poll),
             "QUIET_HOURS": "", "CAP_PER_DAY": "1000000", "CAP_PER_WEEK": "1000000",
             "CONSENT_TRANSACTIONAL": "non-restrictive", "CONSENT_OUTREACH": "restrictive",
             "CHANNEL_RATE_PER_SECOND": str(self.args.rate_limit), "MESSAGE_EXPIRY_HOURS": "72"}
        if self.sink_url:
            s.update({"SMS_PROVIDER": "webhook", "SMS_API_URL": self.sink_url, "SMS_WEBHOOK_SECRET": SECRET,
                      "SMS_FROM": SENDER})
        if self.kind == "sqlite" and self.args.sqlite_synchronous:
            s["SQLITE_SYNCHRONOUS"] = self.args.sqlite_synchronous
        return s

    def env(self) -> dict[str, str]:
        env = _bench_api().clean_env()
        env.update({f"FHIR_OUTREACH_{k}": v for k, v in self.settings().items()})
        return env

    def start_store(self) -> None:
        api = _bench_api()
        if self.kind == "sqlite":
            self.store_url = f"sqlite:///{self.work / 'store.db'}"
            return
        port = api.free_port()
        log = self.work / "nx-27017.log"
        self.nx = self.procs.start("nx-27017", [api.NX, "--db", "memory", "--host", "127.0.0.1", "-p", str(port),
                                                "--log-file", str(self.work / "nx-27017.file.log"),
                                                "--pid-file", str(self.work / "nx-27017.pid")], api.clean_env(), log)
        api.wait_tcp(port, self.nx, log)
        self.store_url = f"mongodb://127.0.0.1:{port}/bench_channels"

    def start_sink(self) -> None:
        api = _bench_api()
        port = api.free_port()
        log = self.work / "sink.log"
        self.sink = self.procs.start("sink", [sys.executable, str(Path(__file__).resolve()), "sink", "--port",
                                              str(port), "--secret", SECRET], api.clean_env(), log)
        api.wait_healthy(f"http://127.0.0.1:{port}/healthz", self.sink, log)
        self.sink_url = f"http://127.0.0.1:{port}/messages"

    def sink_stats(self) -> dict[str, Any]:
        import httpx

        return dict(httpx.get(self.sink_url.rsplit("/", 1)[0] + "/stats", timeout=10).json())

    def start_worker(self) -> subprocess.Popen[bytes]:
        api = _bench_api()
        log = self.work / "worker.log"
        self.worker = self.procs.start("worker", [str(api.BIN / "fhir-outreach"), "worker"], self.env(), log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # it prints one line once it has reached the store
            if self.worker.poll() is not None:
                raise RuntimeError(f"worker exited with {self.worker.returncode}:\n{api.tail(log)}")
            if "waiting for work" in api.tail(log):
                return self.worker
            time.sleep(0.02)
        raise RuntimeError(f"worker did not start:\n{api.tail(log)}")

    def check_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is not None:
            raise RuntimeError(f"worker exited with {self.worker.returncode}:\n"
                               f"{_bench_api().tail(self.work / 'worker.log')}")

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.procs.stop(self.worker)
            self.worker = None

    def pids(self) -> dict[str, int]:
        out = {}
        if self.worker is not None:
            out["worker"] = self.worker.pid
        if self.sink is not None:
            out["sink"] = self.sink.pid
        if self.nx is not None:
            out["nx27017"] = self.nx.pid
        return out

    def open_store(self) -> Any:
        from fhir_outreach.store import open_store

        return open_store(self.store_url, base_url="http://127.0.0.1:9/fhir")


@contextlib.asynccontextmanager
async def bench_store(stack: Stack) -> Any:
    store = stack.open_store()
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def commit_many(store: Any, resources: list[dict[str, Any]], chunk: int = 200) -> None:
    from fhir_outreach.store import Write
    from fhir_outreach.store.base import prepare

    for a in range(0, len(resources), chunk):
        await store.commit([prepare(Write(r["resourceType"], r["id"], r), "http://127.0.0.1:9/fhir")
                            for r in resources[a:a + chunk]])


async def add_records(store: Any, records: list[Any], now: float, chunk: int = 500) -> None:
    for a in range(0, len(records), chunk):
        await asyncio.gather(*(store.add_record(r, now=now) for r in records[a:a + chunk]))


async def states(store: Any, kind: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for (_, state), n in (await store.count_records(kind)).items():
        out[state] = out.get(state, 0) + n
    return out


async def all_records(store: Any, kind: str, state: str | None = None, page: int = 1000) -> list[Any]:
    out: list[Any] = []
    while True:
        got = await store.list_records(kind, state=state, limit=page, offset=len(out))
        out += got
        if len(got) < page:
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


def start_profile(stack: Stack, pid: int, seconds: float, tag: str) -> tuple[subprocess.Popen[bytes], Path]:
    api = _bench_api()
    pyspy = shutil.which("py-spy", path=str(api.BIN)) or shutil.which("py-spy")
    if pyspy is None:
        raise RuntimeError("--profile needs py-spy (/work/venv/bin/pip install py-spy)")
    out = stack.args.results / f"profile-channels-{stack.kind}-{tag}-{stack.args.stamp}.txt"
    argv = [pyspy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "--threads", "--nonblocking",
            "--duration", str(int(seconds)), "--output", str(out)]
    if stack.args.profile_idle:
        argv.append("--idle")
    return stack.procs.start("py-spy", argv, os.environ.copy(), out.with_suffix(".log")), out


def finish_profiles(profs: list[tuple[subprocess.Popen[bytes], Path]], out: dict[str, Any], wait_s: float) -> None:
    for proc, path in profs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait_s)
        if path.exists():
            who = next((w for w in ("nx27017", "sink", "worker") if f"-{w}-" in path.name), "worker")
            out[f"profile_{who}_file"] = str(path)
            out[f"profile_{who}"] = _bench_api().summarise_profile(path, top=30)


# --- 1. SMS ------------------------------------------------------------------------------------------

def denied_patients(n: int, deny: int) -> dict[int, str]:
    """``deny`` patients spread evenly over ``n``, alternately ``optout`` and ``consent``."""
    if not deny:
        return {}
    picked = sorted({(j * n) // min(deny, n) for j in range(min(deny, n))})
    return {i: ("optout", "consent")[j % 2] for j, i in enumerate(picked)}


async def setup_sms(stack: Stack, store: Any, n: int, deny: int, now: float) -> dict[str, int]:
    prefix = "sp"
    denied = denied_patients(n, deny)
    for a in range(0, n, 1000):
        idx = range(a, min(n, a + 1000))
        await commit_many(store, [patient(i, prefix) for i in idx])
        await commit_many(store, [c for i in idx for c in consents(i, prefix, "sms", denied.get(i), now)])
        comms = [sms_communication(i, prefix) for i in idx]
        await commit_many(store, comms)
        await add_records(store, [delivery_record(c, now) for c in comms], now)
    kinds = list(denied.values())
    return {"messages": n, "denied_patients": len(denied), "denied_optout": kinds.count("optout"),
            "denied_consent": kinds.count("consent")}


async def run_inprocess(stack: Stack, store: Any, n: int) -> dict[str, Any]:
    """``Delivery.run_once`` in a loop in this process (the delivery pipeline alone)."""
    from fhir_outreach.channels.delivery import Delivery
    from fhir_outreach.channels.sms import WebhookSmsChannel
    from fhir_outreach.settings import Settings

    values: dict[str, Any] = {k.lower(): v for k, v in stack.settings().items()}
    settings = Settings(**values)
    sms = WebhookSmsChannel(stack.sink_url, SECRET, SENDER)
    d = Delivery(store, settings, {"sms": sms}, key=b"k" * 32, owner="bench-inprocess")
    rounds = 0
    try:
        while await d.run_once():  # as the worker calls it: 50 claimed, delivered concurrently
            rounds += 1
    finally:
        await sms.aclose()
    return {"rounds": rounds, "sent_by_pipeline": d.sent, "event_loop": "uvloop" if stack.args.uvloop else "asyncio"}


async def phase_sms(stack: Stack) -> dict[str, Any]:
    args = stack.args
    n = args.messages
    stack.start_sink()
    now = time.time()
    t = time.monotonic()
    async with bench_store(stack) as store:
        expect = await setup_sms(stack, store, n, args.deny, now)
    setup_s = time.monotonic() - t
    profs: list[tuple[subprocess.Popen[bytes], Path]] = []
    series: list[tuple[float, int]] = []
    async with bench_store(stack) as store:
        if args.mode == "worker":
            worker = stack.start_worker()
            t_ready = time.time()
            cpu = Cpu(stack.pids())
            rss: list[float] = []
            if args.profile:
                profs.append(start_profile(stack, worker.pid, args.profile_seconds, "sms-worker"))
                if stack.nx is not None:
                    profs.append(start_profile(stack, stack.nx.pid, args.profile_seconds, "sms-nx27017"))

            async def done() -> bool:
                rss.append(rss_mb(worker.pid))
                st = await states(store, "delivery")
                finished = st.get("done", 0) + st.get("blocked", 0)
                series.append((round(time.time() - t_ready, 1), finished))
                return finished >= n
            wall = await wait_until(done, args.limit, 0.5, stack, f"{n} deliveries")
            used = cpu.result(n)
            t_events = time.monotonic()

            async def events_done() -> bool:
                st = await states(store, "event")
                return not st.get("pending")
            with contextlib.suppress(RuntimeError):
                await wait_until(events_done, 120, 0.5, stack, "the sent events")
            events_after_s = round(time.monotonic() - t_events, 1)
            stack.stop_worker()
            extra: dict[str, Any] = {"worker_rss_mb_max": max(rss or [0.0]), "events_drained_after_s": events_after_s,
                                     "event_states": await states(store, "event")}
        else:
            t_ready = time.time()
            cpu = Cpu({k: v for k, v in stack.pids().items() if k != "worker"})
            extra = await run_inprocess(stack, store, n)
            used = cpu.result(n)
            wall = time.time() - t_ready
        recs = await all_records(store, "delivery")
        sms_sent = await states(store, "sms-sent")
        sample = [s.resource for s in await store.read_many(
            [("Communication", r.key.split("/")[1]) for r in recs[:: max(1, len(recs) // 200)]]) if s.resource]
    sink = stack.sink_stats()
    finished = sorted(float(r.data["finished"]) for r in recs if r.data.get("finished"))
    by_state: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for r in recs:
        by_state[r.state] = by_state.get(r.state, 0) + 1
        if r.state == "blocked":
            reasons[str(r.data.get("reason"))] = reasons.get(str(r.data.get("reason")), 0) + 1
    span = finished[-1] - finished[0] if len(finished) > 1 else 0.0
    sent = by_state.get("done", 0)
    out: dict[str, Any] = {
        "channel": "sms (generic JSON webhook)", "messages": n, **expect,
        "mode": args.mode if args.mode == "worker" else
        "inprocess" + (" uvloop" if args.uvloop else ""),
        "setup_s": round(setup_s, 1), "delivery_states": by_state, "blocked_reasons": reasons,
        "sink": sink, "sms_sent_records": sms_sent,
        "comm_status_sample": tally(str(c.get("status")) for c in sample),
        "span_s": round(span, 2), "messages_per_s": round((len(finished) - 1) / span, 1) if span > 0 else 0.0,
        "sent_per_s": round(sent / span, 1) if span > 0 else 0.0,
        "wall_from_start_s": round(finished[-1] - t_ready, 2) if finished else None,
        "messages_per_s_from_start": round(len(finished) / (finished[-1] - t_ready), 1) if finished else 0.0,
        "observed_s": round(wall, 1), "done_over_time": series[:: max(1, len(series) // 40)], "cpu": used, **extra,
    }
    if len(finished) > 20:  # does it slow down? rate over the first and last quarter of the messages
        q = len(finished) // 4
        out["messages_per_s_first_quarter"] = round(q / max(finished[q] - finished[0], 1e-6), 1)
        out["messages_per_s_last_quarter"] = round(q / max(finished[-1] - finished[-1 - q], 1e-6), 1)
    gaps = [b - a for a, b in itertools.pairwise(finished)]
    out["gap_between_finishes_ms"] = pct(gaps)
    out["checks"] = {
        "all_finished": len(finished) == n,
        "sink_accepted_equals_sent": sink.get("accepted") == sent,
        "no_duplicate_sends": sink.get("duplicates") == 0,
        "no_bad_signatures": sink.get("bad_signature") == 0 and sink.get("invalid") == 0,
        "blocked_as_expected": reasons == {k: v for k, v in (("opted-out", expect["denied_optout"]),
                                                             ("consent", expect["denied_consent"])) if v},
    }
    finish_profiles(profs, out, args.profile_seconds + 30)
    out["target_met"] = out["messages_per_s"] >= TARGET
    return out


# --- 2. portal ---------------------------------------------------------------------------------------

async def phase_portal(stack: Stack, enrol: str) -> dict[str, Any]:
    from fhir_outreach.journeys import catalog
    from fhir_outreach.journeys.files import parse_text

    args = stack.args
    n = args.messages
    prefix = "pp"
    now = time.time()
    t = time.monotonic()
    denied = denied_patients(n, args.deny)
    async with bench_store(stack) as store:
        plan, templates = parse_text(PORTAL_JOURNEY, name="bench-portal")
        journey, _ = await catalog.load(store, plan, templates, base_url="http://127.0.0.1:9/fhir")
        canonical = journey.canonical
        for a in range(0, n, 1000):
            idx = range(a, min(n, a + 1000))
            await commit_many(store, [patient(i, prefix) for i in idx])
            await commit_many(store, [c for i in idx for c in consents(i, prefix, "portal", denied.get(i), now)])
            if enrol == "events":
                await add_records(store, [portal_event(i, prefix, now) for i in idx], now)
            else:
                await add_records(store, [r for i in idx for r in portal_run(canonical, i, prefix, now)], now)
    setup_s = time.monotonic() - t
    profs: list[tuple[subprocess.Popen[bytes], Path]] = []
    series: list[tuple[float, int]] = []
    async with bench_store(stack) as store:
        worker = stack.start_worker()
        t_ready = time.time()
        cpu = Cpu(stack.pids())
        rss: list[float] = []
        if args.profile:
            profs.append(start_profile(stack, worker.pid, args.profile_seconds, f"portal-{enrol}-worker"))
            if stack.nx is not None:
                profs.append(start_profile(stack, stack.nx.pid, args.profile_seconds, f"portal-{enrol}-nx27017"))

        async def done() -> bool:
            rss.append(rss_mb(worker.pid))
            st = await states(store, "run")
            series.append((round(time.time() - t_ready, 1), st.get("done", 0)))
            return st.get("done", 0) >= n
        wall = await wait_until(done, args.limit, 0.5, stack, f"{n} portal runs")
        used = cpu.result(n)
        stack.stop_worker()
        runs = await all_records(store, "run")
        outputs = [str(o) for r in runs for o in (r.data.get("outputs") or []) if str(o).startswith("Communication/")]
        stored = []
        for a in range(0, len(outputs), 500):
            stored += await store.read_many([tuple(o.split("/")) for o in outputs[a:a + 500]])  # type: ignore[misc]
        run_events = await states(store, "event")
    comms = [s.resource for s in stored if s.resource]
    stamps = sorted(float(e["at"]) for r in runs for e in r.data.get("path") or [])
    ended = sorted(float(r.data["ended"]) for r in runs if r.data.get("ended"))
    first = stamps[0] if stamps else 0.0
    if enrol == "events":
        first = min([first, *(float(r.data.get("started") or first) for r in runs)])
    last = max([*stamps, *ended]) if stamps else 0.0
    span = last - first
    of_denied = [c for c in comms if int(str(c["subject"]["reference"]).split(prefix)[1]) in denied]
    got_denied = sum(1 for c in of_denied if c.get("status") == "in-progress")
    out: dict[str, Any] = {
        "channel": "portal", "mode": f"worker, enrol {enrol}", "messages": n, "setup_s": round(setup_s, 1),
        "runs_done": sum(1 for r in runs if r.state == "done"),
        "run_status": tally(str(r.data.get("status")) for r in runs),
        "communications_written": len(comms),
        "comm_status": tally(str(c.get("status")) for c in comms),
        "languages": tally(str(c.get("language")) for c in comms),
        "denied_patients": len(denied), "denied_patients_messaged": got_denied,
        "span_s": round(span, 2), "messages_per_s": round(len(comms) / span, 1) if span > 0 else 0.0,
        "messages_per_s_from_start": round(len(comms) / (last - t_ready), 1) if last > t_ready else 0.0,
        "observed_s": round(wall, 1), "done_over_time": series[:: max(1, len(series) // 40)], "cpu": used,
        "worker_rss_mb_max": max(rss or [0.0]), "event_states": run_events,
    }
    if len(ended) > 20:
        q = len(ended) // 4
        out["messages_per_s_first_quarter"] = round(q / max(ended[q] - ended[0], 1e-6), 1)
        out["messages_per_s_last_quarter"] = round(q / max(ended[-1] - ended[-1 - q], 1e-6), 1)
    out["denied_patients_blocked"] = tally(str(((c.get("statusReason") or {}).get("coding") or [{}])[0].get("code"))
                                           for c in of_denied if c.get("status") == "not-done")
    out["checks"] = {"all_written": len(comms) == n,
                     "sent_or_blocked": out["comm_status"].get("in-progress", 0) + out["comm_status"].get("not-done", 0)
                     == n}
    finish_profiles(profs, out, args.profile_seconds + 30)
    out["target_met"] = out["messages_per_s"] >= TARGET
    return out


# --- driver ------------------------------------------------------------------------------------------

async def run_phase(kind: str, phase: str, args: argparse.Namespace, procs: Any) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"bench-channels-{kind}-{phase.replace(':', '-')}-"))
    stack = Stack(kind, work, procs, args)
    ok = False
    try:
        stack.start_store()
        others = other_heavy_processes()
        t = time.monotonic()
        if phase == "sms":
            result = await phase_sms(stack)
        else:
            result = await phase_portal(stack, phase.split(":", 1)[1])
        result["phase_seconds"] = round(time.monotonic() - t, 1)
        result["other_heavy_processes_at_start"] = others
        result["other_heavy_processes_at_end"] = other_heavy_processes()
        ok = True
        return result
    finally:
        for _, p in reversed(list(procs.procs)):
            procs.stop(p)
        if ok and not args.keep_data:
            shutil.rmtree(work, ignore_errors=True)
        elif not ok:
            print(f"  (data kept in {work})", file=sys.stderr)


def summary(results: dict[str, Any]) -> str:
    lines = [f"fhir-outreach channels, 1 worker, consent checks on; target >= {TARGET:.0f} messages/s "
             "(nx-27017 is a MongoDB wire-protocol server in Python, not mongod)", ""]
    head = (f"{'store':<7} {'channel':<18} {'mode':<20} {'msgs':>6} {'msg/s':>7} {'from start':>10} {'1st/last q':>12} "
            f"{'worker CPU%':>11} {'ms CPU/msg':>10} {'sink%':>6} {'nx%':>5} {'others%':>7} {'target':>7}")
    lines += [head, "-" * len(head)]
    for kind, phases in results["stores"].items():
        for key, r in phases.items():
            if "error" in r:
                lines.append(f"{kind:<7} {key:<18} ERROR {r['error']}")
                continue
            c = r["cpu"]
            who = "worker" if "worker_cpu_pct" in c else "bench"
            quarters = f"{r.get('messages_per_s_first_quarter', '-')}/{r.get('messages_per_s_last_quarter', '-')}"
            lines.append(
                f"{kind:<7} {r['channel'][:18]:<18} {r['mode'][:20]:<20} {r['messages']:>6} {r['messages_per_s']:>7} "
                f"{r['messages_per_s_from_start']:>10} {quarters:>12} {c.get(f'{who}_cpu_pct', '-'):>11} "
                f"{c.get(f'{who}_cpu_ms_per_message', '-'):>10} {c.get('sink_cpu_pct', '-'):>6} "
                f"{c.get('nx27017_cpu_pct', '-'):>5} {c.get('others_cpu_pct', '-'):>7} "
                f"{'met' if r['target_met'] else 'MISSED':>7}")
    lines.append("")
    for kind, phases in results["stores"].items():
        for key, r in phases.items():
            if "error" in r:
                continue
            bad = [k for k, v in r.get("checks", {}).items() if not v]
            if r["channel"] == "portal":
                how = "the portal path does not check consent" if r["denied_patients_messaged"] else \
                    f"blocked: {r.get('denied_patients_blocked')}"
                lines.append(f"{kind} {key}: {r['communications_written']} portal Communications "
                             f"{r['comm_status']}; {r['denied_patients_messaged']}/{r['denied_patients']} patients "
                             f"with a portal-deny Consent got theirs ({how}); checks "
                             f"{'OK' if not bad else 'FAILED: ' + ', '.join(bad)}")
            else:
                lines.append(f"{kind} {key}: delivery {r['delivery_states']} blocked {r['blocked_reasons']}; sink "
                             f"accepted {r['sink'].get('accepted')} dup {r['sink'].get('duplicates')}; checks "
                             f"{'OK' if not bad else 'FAILED: ' + ', '.join(bad)}")
    return "\n".join(lines)


def wait_quiet(limit_s: float) -> list[str]:
    """Wait (up to ``limit_s``) until no other benchmark or test suite runs; returns what still runs."""
    deadline = time.monotonic() + limit_s
    while True:
        others = other_heavy_processes()
        if not others or time.monotonic() >= deadline:
            return others
        print(f"[{time.strftime('%H:%M:%S')}] waiting for other heavy processes to finish:\n  " + "\n  ".join(others),
              flush=True)
        time.sleep(min(60.0, max(1.0, deadline - time.monotonic())))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sink"]:
        return run_sink(argv[1:])
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--store", choices=["sqlite", "mongo", "both"], default="both")
    parser.add_argument("--phases", default="sms,portal", help="comma list of sms, portal")
    parser.add_argument("--enrol", default="events", help="portal: events and/or runs (comma list)")
    parser.add_argument("--mode", choices=["worker", "inprocess"], default="worker",
                        help="sms: the fhir-outreach worker process, or Delivery.run_once in this process")
    parser.add_argument("--uvloop", action="store_true",
                        help="run this process's event loop on uvloop (what-if for --mode inprocess: the worker "
                             "runs on the default asyncio loop)")
    parser.add_argument("--messages", type=int, default=5000, help="messages per phase")
    parser.add_argument("--deny", type=int, default=300, help="patients with a deny Consent for the channel")
    parser.add_argument("--poll", type=float, default=0.05, help="FHIR_OUTREACH_WORKER_POLL_SECONDS")
    parser.add_argument("--rate-limit", type=float, default=1_000_000.0,
                        help="FHIR_OUTREACH_CHANNEL_RATE_PER_SECOND (the default setting is 50)")
    parser.add_argument("--sqlite-synchronous", choices=["FULL", "NORMAL"], default=None,
                        help="FHIR_OUTREACH_SQLITE_SYNCHRONOUS of the worker (default: the setting's, FULL)")
    parser.add_argument("--limit", type=float, default=900.0, help="give up on a phase after this many seconds")
    parser.add_argument("--quick", action="store_true", help="small sizes (500 messages, 30 denied), for a smoke run")
    parser.add_argument("--profile", action="store_true", help="py-spy the worker (and nx-27017) during each phase")
    parser.add_argument("--profile-seconds", type=float, default=15.0)
    parser.add_argument("--profile-idle", action="store_true", help="py-spy --idle: sample waiting threads too")
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="first wait up to this many seconds until no other bench_*/pytest process runs")
    parser.add_argument("--keep-data", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.deny, args.limit = 500, 30, 120.0
    args.stamp = time.strftime("%Y%m%d-%H%M%S")
    args.results = HERE / "results"
    args.results.mkdir(parents=True, exist_ok=True)
    phases: list[str] = []
    for p in args.phases.split(","):
        if p == "sms":
            phases.append("sms")
        elif p == "portal":
            phases += [f"portal:{m}" for m in args.enrol.split(",")]
        else:
            parser.error(f"unknown phase {p!r}")
    stores = ["sqlite", "mongo"] if args.store == "both" else [args.store]
    out_path = Path(args.out) if args.out else args.results / f"channels-{args.store}-{args.stamp}.json"
    others = wait_quiet(args.wait_quiet) if args.wait_quiet else other_heavy_processes()
    if others:
        print("WARNING: other heavy processes are running (figures will be disturbed):\n  " + "\n  ".join(others))
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": _git_commit(), "machine": _machine(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "target_messages_per_s": TARGET, "other_heavy_processes_at_start": others, "stores": {},
        "note": "nx-27017 is a MongoDB wire-protocol server written in Python on SQLite, not mongod",
    }
    procs = _bench_api().Processes()

    def on_term(signum: int, frame: Any) -> None:
        procs.stop_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    failed = False
    try:
        for kind in stores:
            results["stores"][kind] = {}
            for phase in phases:
                print(f"[{time.strftime('%H:%M:%S')}] {kind}: {phase} ({args.messages} messages) ...", flush=True)
                try:
                    coro = run_phase(kind, phase, argparse.Namespace(**vars(args)), procs)
                    if args.uvloop:
                        import uvloop

                        r = uvloop.run(coro)
                    else:
                        r = asyncio.run(coro)
                    results["stores"][kind][phase] = r
                    print(f"  {r['messages_per_s']} messages/s over {r['span_s']} s", flush=True)
                except Exception as exc:
                    failed = True
                    results["stores"][kind][phase] = {"error": f"{type(exc).__name__}: {exc}"}
                    print(f"  {kind} {phase} failed: {exc}", file=sys.stderr)
                out_path.write_text(json.dumps(results, indent=2))
    finally:
        procs.stop_all()
    table = summary(results)
    results["table"] = table
    out_path.write_text(json.dumps(results, indent=2))
    print("\n" + table)
    print(f"\nJSON: {out_path}")
    return 1 if failed else 0


def _git_commit() -> str:
    with contextlib.suppress(Exception):
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    return "unknown"


def _machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "note": "bench, worker, sink and nx-27017 on the same host"}


if __name__ == "__main__":
    sys.exit(main())

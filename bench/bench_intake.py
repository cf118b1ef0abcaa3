"""Intake benchmark: notifications accepted durably per second, and time to 2xx, against the floor.

For each target, in one run on the same machine: a bare FastAPI endpoint that parses JSON and answers 200
(the floor), then ``fhir-outreach serve`` on SQLite and on MongoDB (nx-27017 wire server) receiving R4
backport full-resource notification Bundles at ``/hooks/{key}`` (store first, answer 200). Load comes from
``wrk`` (Debian package ``wrk``: a C load generator, so the client costs little CPU) with a fixed number of
connections for a fixed duration; latency percentiles are wrk's. After each run the inbox is counted to
check that every acknowledged delivery was stored. Background processing is off during the measurement
(``FHIR_OUTREACH_SERVE_WORKER=false``) so that the figure is the acceptance path alone; a second SQLite run
with processing on is reported too.

    python bench/bench_intake.py [--duration 20] [--connections 32] [--stores sqlite,mongo]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
TOKEN = "bench-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def notification(i: int = 1) -> dict[str, Any]:
    src = "http://source.example/fhir"
    enc = {"resourceType": "Encounter", "id": f"enc-{i}", "status": "finished",
           "meta": {"versionId": "2", "lastUpdated": "2026-11-01T10:00:00.000Z"},
           "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
           "subject": {"reference": "Patient/p-1"}, "period": {"start": "2026-10-28T08:00:00Z",
                                                                "end": "2026-11-01T10:00:00Z"},
           "hospitalization": {"dischargeDisposition": {"coding": [{"code": "home"}]}}}
    status = {"resourceType": "Parameters", "parameter": [
        {"name": "subscription", "valueReference": {"reference": f"{src}/Subscription/s1"}},
        {"name": "topic", "valueCanonical": "http://fhir-outreach.org/SubscriptionTopic/encounter-discharged"},
        {"name": "status", "valueCode": "active"}, {"name": "type", "valueCode": "event-notification"},
        {"name": "events-since-subscription-start", "valueString": str(i)},
        {"name": "notification-event", "part": [
            {"name": "event-number", "valueString": str(i)},
            {"name": "timestamp", "valueInstant": "2026-11-01T10:00:00.100Z"},
            {"name": "focus", "valueReference": {"reference": f"{src}/Encounter/enc-{i}"}}]}]}
    return {"resourceType": "Bundle", "type": "history", "timestamp": "2026-11-01T10:00:00.100Z", "entry": [
        {"fullUrl": "urn:uuid:0d6f7c1e-0000-4000-8000-000000000001", "resource": status},
        {"fullUrl": f"{src}/Encounter/enc-{i}", "resource": enc, "request": {"method": "PUT",
                                                                            "url": f"Encounter/enc-{i}"},
         "response": {"status": "200"}}]}


def wrk(url: str, secret: str | None, duration: int, connections: int, body: bytes, tmp: Path) -> dict[str, float]:
    script = tmp / "post.lua"
    headers = {"Content-Type": "application/fhir+json"}
    if secret:
        headers["Authorization"] = f"Bearer {secret}"
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body.decode())}"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    script.write_text("\n".join(lines) + "\n")
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout

    def ms(text: str) -> float:
        value, unit = re.match(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    pct = dict(re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.M))
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"requests": total, "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "p50_ms": ms(pct["50"]), "p90_ms": ms(pct["90"]), "p99_ms": ms(pct["99"]),
            "non_2xx": int(non2xx.group(1)) if non2xx else 0, "socket_errors": errors.group(1) if errors else ""}


def run_floor(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    port = free_port()
    proc = subprocess.Popen([str(BIN / "uvicorn"), "floor_app:app", "--host", "127.0.0.1", "--port", str(port),
                             "--no-access-log", "--log-level", "warning"], cwd=HERE)
    try:
        wait(f"http://127.0.0.1:{port}/healthz", proc)
        return {"target": "bare FastAPI (floor)",
                **wrk(f"http://127.0.0.1:{port}/hooks/x", None, args.duration, args.connections,
                      json.dumps(notification()).encode(), tmp)}
    finally:
        stop(proc)


def start_nx(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    exe = shutil.which("nx-27017") or str(BIN / "nx-27017")
    proc = subprocess.Popen([exe, "--db", "memory", "-p", str(port), "--host", "127.0.0.1",
                             "--pid-file", str(tmp / "nx.pid"), "--log-file", str(tmp / "nx.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    from pymongo import MongoClient

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            MongoClient(f"mongodb://127.0.0.1:{port}", serverSelectionTimeoutMS=500).admin.command("ping")
            return proc, f"mongodb://127.0.0.1:{port}/bench_intake"
        except Exception:
            time.sleep(0.3)
    raise RuntimeError("nx-27017 did not start")


def run_outreach(args: argparse.Namespace, tmp: Path, store: str, processing: bool) -> dict[str, Any]:
    data = tmp / f"outreach-{store}-{processing}"
    data.mkdir()
    nx = None
    url = f"sqlite:///{data}/store.db"
    if store == "mongo":
        nx, url = start_nx(data)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_OUTREACH_")}
    env.update({"FHIR_OUTREACH_STORE": url, "FHIR_OUTREACH_DATA_DIR": str(data), "FHIR_OUTREACH_PORT": str(port),
                "FHIR_OUTREACH_API_TOKENS": TOKEN, "FHIR_OUTREACH_LOG_LEVEL": "warning",
                "FHIR_OUTREACH_SERVE_WORKER": "true" if processing else "false",
                "FHIR_OUTREACH_SOURCES": json.dumps([{"name": "src", "base_url": "http://127.0.0.1:9/fhir"}])})
    proc = subprocess.Popen([str(BIN / "fhir-outreach"), "serve"], env=env, cwd=data)
    try:
        wait(f"http://127.0.0.1:{port}/healthz", proc)
        admin = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"},
                             timeout=60)
        hook = admin.post("/admin/hooks", json={"source": "src", "mode": "topic"}).json()
        result = wrk(f"http://127.0.0.1:{port}/hooks/{hook['key']}", hook["secret"], args.duration,
                     args.connections, json.dumps(notification()).encode(), tmp)
        counts = admin.get("/admin/counts").json()["inbox"]
        stored = sum(c["count"] for c in counts)
        label = f"fhir-outreach /hooks on {store}" + (" (processing on)" if processing else "")
        return {"target": label, **result, "stored": stored}
    finally:
        stop(proc)
        if nx is not None:
            stop(nx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--stores", default="sqlite,mongo")
    parser.add_argument("--out", default=str(HERE / "results" / "intake.json"))
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("bench_intake needs wrk: apt-get install wrk")
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        rows.append(run_floor(args, tmp))
        for store in args.stores.split(","):
            rows.append(run_outreach(args, tmp, store, processing=False))
        if "sqlite" in args.stores:
            rows.append(run_outreach(args, tmp, "sqlite", processing=True))
    floor = rows[0]["rps"]
    print(f"{'target':<44} {'req/s':>8} {'ratio':>6} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'sent':>7} "
          f"{'stored':>7} non-2xx")
    for r in rows:
        r["ratio_to_floor"] = round(r["rps"] / floor, 3)
        print(f"{r['target']:<44} {r['rps']:>8.0f} {r['ratio_to_floor']:>6.2f} {r['p50_ms']:>7.2f} "
              f"{r['p90_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['requests']:>7} {r.get('stored', '-'):>7} {r['non_2xx']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "duration_s": args.duration,
                                          "connections": args.connections, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

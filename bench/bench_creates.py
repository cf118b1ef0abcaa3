"""Create throughput of the FHIR API measured with a light client (wrk), per store.

``bench_api.py`` drives the API with a Python httpx client, which on a 2-core machine burns about as much
CPU per request as the server and so caps what it can measure. This benchmark sends the same kind of
Task creates with ``wrk`` (Debian package ``wrk``, a C load generator; a Lua script varies patient,
status and identifier per request), for a fixed duration at a fixed number of connections, then checks
with ``_summary=count`` that every acknowledged create is stored.

    python bench/bench_creates.py [--duration 20] [--connections 32] [--stores sqlite,mongo]
    python bench/bench_creates.py --bundle transaction --connections 4   # Bundles of 100 creates
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_intake import BIN, TOKEN, free_port, start_nx, stop, wait

LUA = """
counter = 0
request = function()
  counter = counter + 1
  local statuses = {"requested", "in-progress", "completed", "cancelled"}
  local body = string.format('{"resourceType":"Task","status":"%s","intent":"order",' ..
    '"for":{"reference":"Patient/p%d"},"owner":{"reference":"Practitioner/dr%d"},' ..
    '"authoredOn":"2026-11-01T10:00:00Z","code":{"coding":[{"system":"http://snomed.info/sct","code":"%d"}]},' ..
    '"identifier":[{"system":"urn:bench","value":"%d-%d"}]}',
    statuses[counter % 4 + 1], counter % 1000, counter % 20, 1000 + counter % 50, os.time(), counter)
  return wrk.format("POST", "/fhir/Task", {["Content-Type"] = "application/fhir+json",
    ["Authorization"] = "Bearer %TOKEN%", ["Prefer"] = "return=minimal"}, body)
end
"""


BUNDLE_LUA = """
counter = 0
request = function()
  counter = counter + 1
  local parts = {}
  for i = 1, 100 do
    parts[i] = string.format('{"resource":{"resourceType":"Task","status":"requested","intent":"order",' ..
      '"for":{"reference":"Patient/p%d"},"authoredOn":"2026-11-01T10:00:00Z",' ..
      '"code":{"coding":[{"system":"http://snomed.info/sct","code":"%d"}]},' ..
      '"identifier":[{"system":"urn:bundle","value":"%d-%d-%d"}]},"request":{"method":"POST","url":"Task"}}',
      (counter * 100 + i) % 1000, i % 50, os.time(), counter, i)
  end
  local body = '{"resourceType":"Bundle","type":"%KIND%","entry":[' .. table.concat(parts, ",") .. ']}'
  return wrk.format("POST", "/fhir", {["Content-Type"] = "application/fhir+json",
    ["Authorization"] = "Bearer %TOKEN%", ["Prefer"] = "return=minimal"}, body)
end
"""


def run(store: str, args: argparse.Namespace, tmp: Path) -> dict[str, object]:
    data = tmp / store
    data.mkdir()
    nx, url = None, f"sqlite:///{data}/store.db"
    if store == "mongo":
        nx, url = start_nx(data)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FHIR_OUTREACH_")}
    env.update({"FHIR_OUTREACH_STORE": url, "FHIR_OUTREACH_DATA_DIR": str(data), "FHIR_OUTREACH_PORT": str(port),
                "FHIR_OUTREACH_API_TOKENS": TOKEN, "FHIR_OUTREACH_LOG_LEVEL": "warning"})
    proc = subprocess.Popen([str(BIN / "fhir-outreach"), "serve"], env=env, cwd=data)
    try:
        wait(f"http://127.0.0.1:{port}/healthz", proc)
        script = data / "create.lua"
        lua = BUNDLE_LUA.replace("%KIND%", args.bundle) if args.bundle else LUA
        script.write_text(lua.replace("%TOKEN%", TOKEN))
        out = subprocess.run(["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--latency", "-s",
                              str(script), f"http://127.0.0.1:{port}"], capture_output=True, text=True,
                             check=True).stdout
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        sent = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
        pct = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)", out, re.M))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        time.sleep(1)
        stored = httpx.get(f"http://127.0.0.1:{port}/fhir/Task", params={"_summary": "count"},
                           headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120).json()["total"]
        per = 100 if args.bundle else 1
        return {"store": store, "creates_per_s": rps * per, "sent": sent * per, "stored": stored, "p50": pct["50"],
                "p90": pct["90"], "p99": pct["99"], "non_2xx": int(non2xx.group(1)) if non2xx else 0}
    finally:
        stop(proc)
        if nx is not None:
            stop(nx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--stores", default="sqlite,mongo")
    parser.add_argument("--bundle", choices=["transaction", "batch"], help="send Bundles of 100 creates instead")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "creates.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for store in args.stores.split(","):
            rows.append(run(store, args, Path(tmp)))
    print(f"{'store':<8} {'creates/s':>10} {'p50':>9} {'p90':>9} {'p99':>9} {'sent':>8} {'stored':>8} non-2xx")
    for r in rows:
        print(f"{r['store']:<8} {r['creates_per_s']:>10.0f} {r['p50']:>9} {r['p90']:>9} {r['p99']:>9} "
              f"{r['sent']:>8} {r['stored']:>8} {r['non_2xx']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "duration_s": args.duration,
                                          "connections": args.connections, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

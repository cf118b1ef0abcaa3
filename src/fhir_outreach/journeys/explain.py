"""Why a run took its path: each executed step with the condition values it computed, the evidence resources
it read and the resources it wrote, as JSON (``why``) and as a plain-text transcript (``render``). The
transcript only contains facts of the run (no store timestamps), so the same run always reads the same —
``journey simulate`` relies on that for byte-identical output."""

from __future__ import annotations

import json
from typing import Any

from ..errors import NotFound
from ..store import Store
from ..work.clock import fhir_instant
from .runner import RUN


def why_of(key: str, data: dict[str, Any]) -> dict[str, Any]:
    steps = []
    for entry in data.get("path") or []:
        item = {k: v for k, v in entry.items() if k != "at"}
        item["at"] = fhir_instant(float(entry.get("at") or 0))
        steps.append(item)
    out: dict[str, Any] = {
        "run": key, "journey": data.get("canonical"), "patient": data.get("patient"),
        "status": data.get("status"), "binding": data.get("binding") or None,
        "trigger": {"focus": data.get("focus"), "interaction": data.get("interaction"), "source": data.get("source"),
                    "event": data.get("event_key")},
        "started": fhir_instant(float(data.get("started") or 0)),
        "ended": fhir_instant(float(data["ended"])) if data.get("ended") else None,
        "waiting": ({"step": data.get("await", {}).get("step"), "event": data.get("await", {}).get("event"),
                     "until": fhir_instant(float(data["await"]["until"]))} if data.get("await") else
                    {"next": data.get("next")} if data.get("status") == "active" and data.get("next") else None),
        "outputs": list(data.get("outputs") or []),
        "steps": steps,
    }
    if "goal_met" in data:
        out["goal_met"] = data["goal_met"]
    if data.get("reason"):
        out["reason"] = data["reason"]
    return out


async def why(store: Store, run_id: str) -> dict[str, Any]:
    rec = await store.get_record(RUN, run_id)
    if rec is None:
        raise NotFound(f"no journey run {run_id!r}")
    return why_of(rec.key, rec.data)


def _value(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def render(w: dict[str, Any]) -> str:
    lines = [f"run {w['run']}", f"  journey  {w['journey']}", f"  patient  {w['patient']}",
             f"  trigger  {w['trigger']['interaction']} of {w['trigger']['focus']} (source {w['trigger']['source']})",
             f"  started  {w['started']}",
             f"  status   {w['status']}" + (f" at {w['ended']}" if w.get("ended") else "")
             + (f" ({w['reason']})" if w.get("reason") else "")]
    if "goal_met" in w:
        lines.append(f"  goal     {'met' if w['goal_met'] else 'not met' if w['goal_met'] is False else 'unknown'}")
    if w.get("waiting"):
        lines.append("  waiting  " + ", ".join(f"{k} {v}" for k, v in w["waiting"].items() if v))
    for s in w["steps"]:
        lines.append(f"  [{s['seq']}] {s['at']}  {s['step']} ({s['kind']}): {s.get('note', '')}")
        for v in s.get("values") or []:
            lines.append(f"        {v.get('expression')} = {_value(v.get('value'))}  [arm {v.get('arm')}]")
        if s.get("error"):
            lines.append(f"        error: {s['error']}")
        if s.get("evidence"):
            lines.append(f"        evidence: {', '.join(s['evidence'])}")
        if s.get("outputs"):
            lines.append(f"        wrote: {', '.join(s['outputs'])}")
        for n in s.get("notes") or []:
            lines.append(f"        note: {n}")
    return "\n".join(lines) + "\n"

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
    out = why_of(rec.key, rec.data)
    out["delivery"] = await delivery_status(store, out["outputs"])
    return out


async def delivery_status(store: Store, refs: list[str]) -> dict[str, str]:
    """What became of each message and task the run wrote: its status now, and why it was not done."""
    status: dict[str, str] = {}
    for ref in refs:
        rtype, _, rid = ref.partition("/")
        stored = await store.read(rtype, rid)
        res = stored.resource if stored is not None else None
        if not res:
            continue
        text = str(res.get("status"))
        reason = res.get("statusReason")
        if isinstance(reason, dict):
            code = next((c.get("code") for c in reason.get("coding") or []), None)
            text += f" ({code}: {reason.get('text') or ''})" if code else f" ({reason.get('text')})"
        status[ref] = text
    return status


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
    for ref, state in (w.get("delivery") or {}).items():
        lines.append(f"  output   {ref}: {state}")
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


def as_parameters(w: dict[str, Any]) -> dict[str, Any]:
    """The explanation as a FHIR ``Parameters`` resource (the ``$why`` operation's answer)."""
    params: list[dict[str, Any]] = [
        {"name": "run", "valueReference": {"reference": f"RequestGroup/{w['run']}"}},
        {"name": "journey", "valueCanonical": str(w["journey"])},
        {"name": "patient", "valueReference": {"reference": str(w["patient"])}},
        {"name": "status", "valueCode": str(w["status"])},
    ]
    if w["trigger"].get("focus"):
        params.append({"name": "trigger", "valueReference": {"reference": str(w["trigger"]["focus"])}})
    if "goal_met" in w and w["goal_met"] is not None:
        params.append({"name": "goalMet", "valueBoolean": bool(w["goal_met"])})
    for s in w["steps"]:
        parts: list[dict[str, Any]] = [
            {"name": "seq", "valueInteger": int(s["seq"])}, {"name": "step", "valueString": str(s["step"])},
            {"name": "kind", "valueCode": str(s["kind"])}, {"name": "at", "valueDateTime": s["at"]},
            {"name": "note", "valueString": str(s.get("note") or "-")}]
        if s.get("arm"):
            parts.append({"name": "arm", "valueString": str(s["arm"])})
        for v in s.get("values") or []:
            value = v.get("value")
            vpart = {"valueBoolean": value} if isinstance(value, bool) else {"valueString": _value(value)}
            parts.append({"name": "condition", "part": [
                {"name": "arm", "valueString": str(v.get("arm"))},
                {"name": "expression", "valueString": str(v.get("expression"))}, {"name": "value", **vpart}]})
        if s.get("error"):
            parts.append({"name": "error", "valueString": str(s["error"])})
        parts += [{"name": "evidence", "valueReference": {"reference": r}} for r in s.get("evidence") or []]
        parts += [{"name": "output", "valueReference": {"reference": r}} for r in s.get("outputs") or []]
        params.append({"name": "step", "part": parts})
    params.append({"name": "transcript", "valueString": render(w)})
    return {"resourceType": "Parameters", "parameter": params}

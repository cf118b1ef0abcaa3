"""Step kinds: what each journey step does, given a run's context, and the outcome it reports.

Every executor is idempotent: a message or task step writes its Communication/Task (and a Provenance) with
an id derived from the run, the step and the visit number, as a create that must not exist yet, so a step
re-run after a crash finds its earlier output instead of writing a second one. An executor never decides
where the run goes next by itself beyond returning an ``Outcome``; ``runner`` records it and moves on.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from liquid.exceptions import LiquidError

from ..errors import CommitInProgress, Conflict, PreconditionFailed
from ..fhir.fhirpath import FhirPathError
from ..store import Write
from ..store.base import MUST_NOT_EXIST, prepare
from ..work.clock import fhir_instant, to_datetime
from . import texts
from .definition import (
    CHANNEL_SYSTEM,
    EXT,
    IDENTIFIER_SYSTEM,
    STEP_SYSTEM,
    Arm,
    Step,
    add_duration,
)

if TYPE_CHECKING:
    from .runner import RunContext

NAMESPACE = uuid.UUID("5d0c1f2e-7f43-4d7e-9a53-8f1c0b6a2e11")
CATEGORY_SYSTEM = "http://fhir-outreach.org/CodeSystem/message-category"
PREFERENCE_URL = EXT + "contact-preference"


def derived_id(key: str) -> str:
    return str(uuid.uuid5(NAMESPACE, key))


@dataclass
class Outcome:
    """What a step did: ``go`` = the next step id (None ends the run), or a wait (``until``), or an await."""

    kind: str  # go | wait | await | end
    go: str | None = None
    until: float | None = None
    arm: str | None = None
    note: str = ""
    values: list[dict[str, Any]] = field(default_factory=list)  # condition evaluations
    outputs: list[str] = field(default_factory=list)  # references written
    evidence: list[str] = field(default_factory=list)  # references read
    await_: dict[str, Any] | None = None


def _arm_go(step: Step, arm: Arm | None) -> str | None:
    return arm.target if arm else None


async def run_branch(ctx: RunContext, step: Step) -> Outcome:
    values: list[dict[str, Any]] = []
    for arm in step.arms:
        if arm.label == "error":
            continue
        if arm.condition is None:
            return Outcome("go", arm.target, arm=arm.label, note=f"else -> {arm.target or 'end'}", values=values,
                           evidence=ctx.take_evidence())
        value = await ctx.boolean(arm.condition)
        values.append({"arm": arm.label, "expression": arm.condition, "value": value})
        if value is True:
            return Outcome("go", arm.target, arm=arm.label, note=f"{arm.label} -> {arm.target or 'end'}",
                           values=values, evidence=ctx.take_evidence())
    return Outcome("go", None, note="no arm matched and no else: the run ends", values=values,
                   evidence=ctx.take_evidence())


def _reference(value: Any) -> dict[str, Any] | None:
    if isinstance(value, dict) and value.get("resourceType") and value.get("id"):
        return {"reference": f"{value['resourceType']}/{value['id']}"}
    if isinstance(value, dict) and isinstance(value.get("reference"), str):
        return {"reference": value["reference"], **({"display": value["display"]} if value.get("display") else {})}
    if isinstance(value, str) and value:
        return {"reference": value} if "/" in value else {"display": value}
    return None


def _codeable(value: Any, default_system: str | None = None) -> dict[str, Any] | None:
    if isinstance(value, dict) and ("coding" in value or "text" in value):
        return value
    if isinstance(value, dict) and "code" in value:
        return {"coding": [value]}
    if isinstance(value, str) and value:
        if "|" in value:
            system, code = value.split("|", 1)
            return {"coding": [{"system": system, "code": code}]}
        if default_system:
            return {"coding": [{"system": default_system, "code": value}]}
        return {"text": value}
    return None


def _first(values: list[Any]) -> Any:
    return values[0] if values else None


async def _write_outputs(ctx: RunContext, resource: dict[str, Any], *, template: str) -> list[str]:
    """Store an output and its Provenance as one create-only commit; after a crash, find them instead."""
    rtype, rid = resource["resourceType"], resource["id"]
    prov: dict[str, Any] = {
        "resourceType": "Provenance", "id": derived_id(f"provenance|{rtype}/{rid}"),
        "target": [{"reference": f"{rtype}/{rid}"}],
        "recorded": fhir_instant(ctx.now),
        "activity": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
                                 "code": "CREATE"}]},
        "agent": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type",
                                        "code": "assembler"}]},
                   "who": {"display": "fhir-outreach journey engine"}}],
        "entity": [{"role": "derivation", "what": {"reference": f"PlanDefinition/{ctx.journey.plan_id}",
                                                   "display": ctx.journey.canonical}}
                   if ctx.journey.plan_id else
                   {"role": "derivation", "what": {"display": ctx.journey.canonical}},
                   {"role": "derivation", "what": {"display": template}}],
    }
    if ctx.trigger_ref:
        prov["entity"].insert(0, {"role": "source", "what": {"reference": ctx.trigger_ref}})
    writes = [prepare(Write(rtype, rid, resource, expect=MUST_NOT_EXIST), ctx.base_url),
              prepare(Write("Provenance", str(prov["id"]), prov, expect=MUST_NOT_EXIST), ctx.base_url)]
    await ctx.ensure_lease()  # a worker that lost the run to another must not act for it
    try:
        await ctx.store.commit(writes, now=to_datetime(ctx.now))
    except CommitInProgress:
        raise  # another attempt's commit is unfinished: not "already written"; the runner retries later
    except Conflict as exc:  # written before a crash: the deterministic ids find both
        for ref_type, ref_id in ((rtype, rid), ("Provenance", str(prov["id"]))):
            found = await ctx.store.read(ref_type, ref_id)
            if found is None or found.deleted:
                raise Conflict(f"{ref_type}/{ref_id} is not there although its id is taken; retry") from exc
        ctx.note(f"{rtype}/{rid} already written by an earlier attempt")
    refs = [f"{rtype}/{rid}", f"Provenance/{prov['id']}"]
    ctx.produced(refs)
    return refs


def _identity(ctx: RunContext, step: Step, seq: int) -> tuple[str, dict[str, str]]:
    value = f"{ctx.run_id}/{step.id}/{seq}"
    return derived_id(value), {"system": IDENTIFIER_SYSTEM, "value": value}


async def run_message(ctx: RunContext, step: Step, seq: int) -> Outcome:
    assert step.template is not None
    tpl = ctx.journey.template(step.template)
    values: dict[str, Any] = {}
    variables: dict[str, Any] = {}
    for path, expr in tpl.values:
        result = await ctx.evaluate(expr)
        if path == "actions":
            values[path] = [str(v) for v in result]
        elif path.startswith("var."):
            variables[path[4:]] = _first(result)
        else:
            values[path] = _first(result)
    if tpl.texts:
        language, text = texts.choose(tpl.texts, texts.languages_of(await ctx.patient()))
        try:
            values["payload"] = texts.render(text, variables)
        except LiquidError as exc:
            raise FhirPathError(f"message-text {language} of {tpl.name}", str(exc).splitlines()[0]) from exc
        values["language"] = language
    medium = str(values.get("medium") or "portal")
    rid, identifier = _identity(ctx, step, seq)
    recipient = _reference(values.get("recipient")) or {"reference": ctx.patient_ref}
    comm: dict[str, Any] = {
        "resourceType": "Communication", "id": rid, "identifier": [identifier],
        "instantiatesCanonical": [tpl.canonical], "basedOn": [{"reference": f"RequestGroup/{ctx.run_id}"}],
        "status": "in-progress" if medium == "portal" else "preparation",
        "medium": [{"coding": [{"system": CHANNEL_SYSTEM, "code": medium}]}],
        "subject": _reference(values.get("subject")) or {"reference": ctx.patient_ref},
        "recipient": [recipient],
        "payload": [{"contentString": str(values.get("payload") or "")}],
    }
    if values.get("category"):
        comm["category"] = [_codeable(values["category"], CATEGORY_SYSTEM)]
    if values.get("sender"):
        comm["sender"] = _reference(values["sender"])
    if values.get("title"):
        comm["topic"] = {"text": str(values["title"])}
    if values.get("language"):
        comm["language"] = str(values["language"])
    actions = [a for a in values.get("actions") or [] if "=" in a]
    if actions:
        comm["extension"] = [{"url": EXT + "message-action", "valueString": a} for a in actions]
    if ctx.trigger_ref:
        comm["about"] = [{"reference": ctx.trigger_ref}]
    if medium == "portal":
        comm["sent"] = fhir_instant(ctx.now)
        blocked = await ctx.portal_block(comm)
        if blocked is not None:  # the portal has no delivery queue: consent is checked here, before writing
            reason, detail = blocked
            comm.pop("sent")
            comm["status"] = "not-done"
            comm["statusReason"] = {"coding": [{"system": "http://fhir-outreach.org/CodeSystem/delivery-reason",
                                                "code": reason}], "text": detail}
    refs = await _write_outputs(ctx, comm, template=tpl.canonical)
    await ctx.hand_to_channel(comm, medium)
    return Outcome("go", step.next, note=f"{medium} message {refs[0]}", outputs=refs,
                   evidence=ctx.take_evidence())


async def run_task(ctx: RunContext, step: Step, seq: int) -> Outcome:
    assert step.template is not None
    tpl = ctx.journey.template(step.template)
    values = {path: _first(await ctx.evaluate(expr)) for path, expr in tpl.values}
    rid, identifier = _identity(ctx, step, seq)
    task: dict[str, Any] = {
        "resourceType": "Task", "id": rid, "identifier": [identifier], "instantiatesCanonical": tpl.canonical,
        "basedOn": [{"reference": f"RequestGroup/{ctx.run_id}"}], "status": "requested", "intent": "order",
        "for": {"reference": ctx.patient_ref}, "authoredOn": fhir_instant(ctx.now),
        "description": str(values.get("description") or tpl.title or tpl.name),
    }
    if ctx.trigger_ref:
        task["focus"] = {"reference": ctx.trigger_ref}
    if values.get("priority"):
        task["priority"] = str(values["priority"])
    if values.get("code"):
        task["code"] = _codeable(values["code"])
    owner = _reference(values.get("owner"))
    if owner:
        task["owner"] = owner
    due = values.get("due")
    if due:
        due_text = str(due)
        when = fhir_instant(add_duration(to_datetime(ctx.now), due_text).timestamp()) if due_text.startswith("P") \
            else due_text
        task["restriction"] = {"period": {"end": when}}
    refs = await _write_outputs(ctx, task, template=tpl.canonical)
    return Outcome("go", step.next, note=f"task {refs[0]}", outputs=refs, evidence=ctx.take_evidence())


def parse_when(value: Any) -> float:
    text = str(value)
    if len(text) == 10:
        text += "T00:00:00+00:00"
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        raise ValueError(f"{value!r} has no time zone")
    return moment.timestamp()


async def run_wait(ctx: RunContext, step: Step) -> Outcome:
    if step.wait:
        until = add_duration(to_datetime(ctx.now), step.wait).timestamp()
        note = f"wait {step.wait}"
    else:
        assert step.wait_until is not None
        value = _first(await ctx.evaluate(step.wait_until))
        if value is None:
            raise FhirPathError(step.wait_until, "returned nothing; a wait-until needs a dateTime")
        try:
            until = parse_when(value)
        except ValueError as exc:
            raise FhirPathError(step.wait_until, f"returned {value!r}, not a dateTime with a time zone") from exc
        note = f"wait until {fhir_instant(until)}"
    return Outcome("wait", step.next, until=max(until, ctx.now), note=note, evidence=ctx.take_evidence())


async def run_await(ctx: RunContext, step: Step) -> Outcome:
    wf = step.wait_for
    assert wf is not None
    target = ctx.output_of(wf.step) if wf.step else None
    if wf.step and target is None:
        raise FhirPathError(f"wait-for step {wf.step}", f"step {wf.step!r} has produced nothing in this run yet")
    until = add_duration(to_datetime(ctx.now), wf.timeout).timestamp()
    spec = {"event": wf.event, "step": wf.step, "target": target, "criteria": wf.criteria, "until": until}
    return Outcome("await", None, until=until, note=f"await {wf.event}" + (f" of {target}" if target else "") +
                   f" until {fhir_instant(until)}", await_=spec)


def contact_preference(patient: dict[str, Any] | None, now: float | None = None) -> str:
    """sms | email | portal | none, from our extension, else the best-ranked current telecom (one whose
    ``period.end`` has passed at ``now``, default the current time, is ignored)."""
    now = time.time() if now is None else now
    if not patient:
        return "none"
    for e in patient.get("extension") or []:
        if e.get("url") == PREFERENCE_URL and e.get("valueCode") in ("sms", "email", "portal"):
            return str(e["valueCode"])
    ranked: list[tuple[int, int, str]] = []
    for i, t in enumerate(patient.get("telecom") or []):
        end = (t.get("period") or {}).get("end")
        if end and _ended(str(end), now):
            continue
        system = t.get("system")
        kind = "sms" if system == "sms" or (system == "phone" and t.get("use") == "mobile") else \
            "email" if system == "email" else None
        if kind:
            ranked.append((int(t.get("rank") or 1_000_000), i, kind))
    if ranked:
        return min(ranked)[2]
    return "portal" if patient.get("active", True) is not False else "none"


def _ended(end: str, now: float) -> bool:
    try:
        return parse_when(end) <= now
    except ValueError:
        return True


async def run_preference(ctx: RunContext, step: Step) -> Outcome:
    patient = await ctx.patient()
    pref = contact_preference(patient, ctx.now)
    arm = step.arm(pref) or step.arm("else")
    go = arm.target if arm else step.next
    return Outcome("go", go, arm=arm.label if arm else None, note=f"contact preference {pref} -> {go or 'end'}",
                   values=[{"arm": pref, "expression": "contact preference", "value": pref}],
                   evidence=[ctx.patient_ref])


def _set_path(resource: dict[str, Any], path: str, value: Any) -> bool:
    """Set a dotted element path (``target.dueDate``, ``target[1].dueDate``); lists take their first element
    unless indexed. Returns whether anything changed."""
    node: Any = resource
    parts = path.split(".")
    for i, raw in enumerate(parts):
        name, _, index = raw.partition("[")
        idx = int(index.rstrip("]")) if index else None
        last = i == len(parts) - 1
        if last and idx is None:
            if node.get(name) == value:
                return False
            node[name] = value
            return True
        child = node.get(name)
        if isinstance(child, list) or idx is not None:
            items = child if isinstance(child, list) else []
            node[name] = items
            pos = idx or 0
            while len(items) <= pos:
                items.append({})
            if last:
                if items[pos] == value:
                    return False
                items[pos] = value
                return True
            node = items[pos]
        else:
            if child is None:
                child = node[name] = {}
            node = child
    return False


async def run_update(ctx: RunContext, step: Step) -> Outcome:
    assert step.update_target is not None
    target = _first(await ctx.evaluate(step.update_target))
    ref = _reference(target)
    if not ref or "/" not in ref.get("reference", ""):
        raise FhirPathError(step.update_target, f"returned {target!r}, not a resource or reference")
    rtype, rid = ref["reference"].split("/")[-2:]
    current, version = await ctx.read_for_update(rtype, rid)
    values = [(path, _first(await ctx.evaluate(expr, extra={"target": current}))) for path, expr in step.updates]
    changed = False
    updated = dict(current)
    for path, value in values:
        changed |= _set_path(updated, path, value)
    note = f"{rtype}/{rid}: " + ", ".join(f"{p} = {v!r}" for p, v in values)
    if not changed:
        return Outcome("go", step.next, note=note + " (already set)", evidence=[f"{rtype}/{rid}"])
    await ctx.ensure_lease()
    try:
        await ctx.write_update(updated, version)
    except PreconditionFailed:
        raise  # changed meanwhile: the runner retries the step, which re-reads
    return Outcome("go", step.next, note=note, outputs=[f"{rtype}/{rid}"], evidence=[f"{rtype}/{rid}"])


def step_coding(kind: str) -> dict[str, Any]:
    return {"coding": [{"system": STEP_SYSTEM, "code": kind}]}

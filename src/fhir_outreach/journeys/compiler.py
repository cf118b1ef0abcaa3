"""The YAML authoring form ⇄ FHIR: ``compile_journey`` turns the concise form (``docs/journeys.md``) into
exactly one OutreachJourney ``PlanDefinition`` and its ``ActivityDefinition`` templates; ``decompile`` turns
those resources back into the YAML form. ``compile_journey(decompile(...))`` gives the same resources.

The compiler checks the shape of the YAML (unknown keys, wrong types) and says where; the journey rules
(targets, FHIRPath, cycles, templates) are checked by ``definition.parse_journey`` on the result, so the
FHIR API and the CLI enforce the same rules.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from ..errors import InvalidJourney
from .definition import (
    ARM_SYSTEM,
    CHANNELS,
    EXT,
    FHIRPATH,
    JOURNEY_URL_BASE,
    MESSAGE_PROFILE,
    PROFILE,
    STEP_KINDS,
    STEP_SYSTEM,
    TASK_PROFILE,
    TEMPLATE_URL_BASE,
    ext,
    fhir_duration_to_iso,
    iso_to_fhir_duration,
)

DISCLAIMER = ("Template for illustration only. Not a medical device and not clinical decision support: "
              "review and adapt before use; you are responsible for licensing any terminology it uses "
              "(SNOMED CT, LOINC, ...).")
TOP_KEYS = {"journey", "url", "version", "title", "status", "description", "trigger", "reentry", "binding",
            "exit", "goal", "data", "templates", "steps", "copyright", "id"}
ISO_DURATION = re.compile(r"P(?!$)(\d+Y)?(\d+M)?(\d+W)?(\d+D)?(T(?=\d)(\d+H)?(\d+M)?(\d+S)?)?")
ACTIONS_EXPR = re.compile(r"'[^'=]+=[^']*'( \| '[^'=]+=[^']*')*")
ARM_CODES = ("event", "timeout", "error", "sms", "email", "portal", "none", "else")
STEP_KEYS = {"id", "title", "next", "after", "on-event", "on-timeout", "on-error", *STEP_KINDS}


class _Problems(list[tuple[str, str]]):
    def add(self, where: str, why: str) -> None:
        self.append((where, why))


def machine_name(name: str) -> str:
    """``patient-discharge`` → ``PatientDischarge`` (FHIR wants a name usable as an identifier: pdf-0)."""
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[-_\s]+", name) if part)


def author_name(resource: dict[str, Any], base: str) -> str:
    """The YAML name back: the tail of our own url, else the machine name in kebab case."""
    url = str(resource.get("url") or "")
    if url.startswith(base):
        return url[len(base):]
    return re.sub(r"(?<!^)(?=[A-Z])", "-", str(resource.get("name") or "")).lower()


def _expr(text: Any) -> dict[str, str]:
    return {"language": FHIRPATH, "expression": str(text)}


def _id_for(url: str, version: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1]
    digest = hashlib.sha256(f"{url}|{version}".encode()).hexdigest()[:8]
    return f"{name}-{version}".replace(".", "-")[:55] + f"-{digest}"


def _duration(text: Any, where: str, p: _Problems) -> dict[str, Any]:
    try:
        return iso_to_fhir_duration(str(text))
    except ValueError as exc:
        p.add(where, str(exc))
        return {"value": 0, "unit": "seconds", "system": "http://unitsofmeasure.org", "code": "s"}


def _related(target: str, delay: str | None = None, p: _Problems | None = None,
             where: str = "after") -> list[dict[str, Any]]:
    rel: dict[str, Any] = {"actionId": target, "relationship": "before-start"}
    if delay:
        rel["offsetDuration"] = _duration(delay, where, p if p is not None else _Problems())
    return [rel]


def _arm(step_id: str, label: str, target: str | None, condition: str | None = None, *,
         ids: frozenset[str] = frozenset()) -> dict[str, Any]:
    arm: dict[str, Any] = {"id": f"{step_id}-{label}"}
    if label in ARM_CODES:
        arm["code"] = [{"coding": [{"system": ARM_SYSTEM, "code": label}]}]
    else:  # a branch arm's own name is free text, not a code of the journey-arm system
        arm["title"] = label
    if condition is not None:
        arm["condition"] = [{"kind": "applicability", "expression": _expr(condition)}]
    if target and (target != "end" or "end" in ids):  # "end" ends the run unless a step is named so
        arm["relatedAction"] = _related(target)
    return arm


def _trigger(spec: Any, p: _Problems) -> dict[str, Any] | None:
    if not isinstance(spec, dict):
        p.add("trigger", "must be a mapping: {topic: ...}, {type: ..., on: [...]} or {every: ..., search: ...}")
        return None
    unknown = sorted(str(k) for k in spec if k not in ("topic", "type", "on", True, "when", "every", "search"))
    if unknown:
        p.add("trigger", f"unknown key(s) {', '.join(unknown)} (topic, type, on, when, every, search)")
    out: dict[str, Any]
    if "topic" in spec:
        out = {"type": "named-event", "name": str(spec["topic"])}
    elif "every" in spec:
        dur = _duration(spec["every"], "trigger", p)
        out = {"type": "periodic", "timingTiming": {"repeat": {"frequency": 1, "period": dur["value"],
                                                               "periodUnit": dur["code"]}},
               "extension": [{"url": EXT + "trigger-search", "valueString": str(spec.get("search") or "")}]}
    elif "type" in spec:
        on = spec.get("on", spec.get(True)) or ["create", "update"]  # YAML 1.1 reads a bare `on` as True
        on = [on] if isinstance(on, str) else list(on)
        kinds = {("create",): "data-added", ("update",): "data-modified"}
        out = {"type": kinds.get(tuple(sorted(on)), "data-changed"), "data": [{"type": str(spec["type"])}]}
        if not set(on) <= {"create", "update"}:
            p.add("trigger.on", f"only create and update start journeys, not {sorted(set(on) - {'create', 'update'})}")
    else:
        p.add("trigger", "needs topic, type or every")
        return None
    if spec.get("when"):
        out["condition"] = _expr(spec["when"])
    return out


def _template(name: str, spec: Any, p: _Problems, version: str) -> dict[str, Any] | None:
    if not isinstance(spec, dict) or spec.get("kind") not in ("message", "task"):
        p.add(f"templates.{name}", "needs kind: message or kind: task")
        return None
    kind = spec["kind"]
    url = str(spec.get("url") or TEMPLATE_URL_BASE + name)
    ver = str(spec.get("version") or version)
    res: dict[str, Any] = {
        "resourceType": "ActivityDefinition", "id": _id_for(url, ver),
        "meta": {"profile": [MESSAGE_PROFILE if kind == "message" else TASK_PROFILE]},
        "url": url, "version": ver, "name": machine_name(name), "title": str(spec.get("title") or name),
        "status": "active", "kind": "CommunicationRequest" if kind == "message" else "Task",
        "usage": DISCLAIMER, "dynamicValue": []}
    for key, value in spec.items():
        if key in ("kind", "url", "version", "title"):
            continue
        if key == "text":  # Liquid, one variant per language: a plain string is English
            variants = value if isinstance(value, dict) else {"en": value}
            res["extension"] = [{"url": EXT + "message-text", "extension": [
                {"url": "language", "valueCode": str(lang)}, {"url": "text", "valueString": str(txt)}]}
                for lang, txt in variants.items()]
            continue
        if key == "vars":
            if not isinstance(value, dict):
                p.add(f"templates.{name}.vars", "is a mapping of variable name to FHIRPath")
                continue
            res["dynamicValue"] += [{"path": f"var.{var}", "expression": _expr(e)} for var, e in value.items()]
            continue
        if key == "actions":  # button label -> the reply it sends (a Teams card's actions)
            if not isinstance(value, dict):
                p.add(f"templates.{name}.actions", "is a mapping of button label to reply text")
                continue
            items = " | ".join("'" + f"{label}={reply}".replace("'", "\\'") + "'" for label, reply in value.items())
            res["dynamicValue"].append({"path": "actions", "expression": _expr(items)})
            continue
        if key == "subject-line":
            key = "title"
        expr = value
        if key == "medium" and str(value) in CHANNELS:
            expr = f"'{value}'"  # a bare channel name is a literal
        if key == "due" and ISO_DURATION.fullmatch(str(value)):
            expr = f"'{value}'"  # so is a bare duration
        res["dynamicValue"].append({"path": key, "expression": _expr(expr)})
    return res


def _step(spec: Any, i: int, p: _Problems, tpl_urls: dict[str, str], ids: frozenset[str]) -> dict[str, Any] | None:
    if not isinstance(spec, dict) or not spec.get("id"):
        p.add(f"steps[{i}]", "each step is a mapping with an id")
        return None
    sid = str(spec["id"])
    unknown = set(spec) - STEP_KEYS
    if unknown:
        p.add(f"step {sid}", f"unknown key(s) {', '.join(sorted(unknown))}")
    kinds = [k for k in STEP_KINDS if k in spec]
    if len(kinds) != 1:
        p.add(f"step {sid}", f"needs exactly one of {', '.join(STEP_KINDS)} (has {kinds or 'none'})")
        return None
    kind = kinds[0]
    body = spec[kind]
    action: dict[str, Any] = {"id": sid, "code": [{"coding": [{"system": STEP_SYSTEM, "code": kind}]}]}
    if spec.get("title"):
        action["title"] = str(spec["title"])
    arms: list[dict[str, Any]] = []
    if kind == "branch":
        if not isinstance(body, list):
            p.add(f"step {sid}", "branch is a list of {when, goto} arms and an optional {else}")
            body = []
        for j, arm in enumerate(body):
            if isinstance(arm, dict) and "else" in arm:
                arms.append(_arm(sid, "else", str(arm["else"]), ids=ids))
            elif isinstance(arm, dict) and isinstance(arm.get("label"), bool | int | float):
                p.add(f"step {sid} arm {j + 1}", f"label {arm['label']!r} is not text; quote it (YAML reads "
                                                 "yes/no/on/off as booleans)")
            elif isinstance(arm, dict) and "when" in arm:
                arms.append(_arm(sid, str(arm.get("label") or f"when{j + 1}"), arm.get("goto"), str(arm["when"]), ids=ids))
            else:
                p.add(f"step {sid} arm {j + 1}", "needs when+goto, or else")
    elif kind in ("message", "task"):
        action["definitionCanonical"] = tpl_urls.get(str(body), str(body))
        if str(body) not in tpl_urls and "|" not in str(body) and "/" not in str(body):
            p.add(f"step {sid}", f"template {body!r} is not defined under templates")
    elif kind == "wait":
        if isinstance(body, dict) and "until" in body:
            action["extension"] = [{"url": EXT + "wait-until", "valueExpression": _expr(body["until"])}]
        else:
            action["timingDuration"] = _duration(body, f"step {sid}", p)
    elif kind == "await":
        body = body if isinstance(body, dict) else {}
        parts: list[dict[str, Any]] = [{"url": "event", "valueCode": str(body.get("event"))}]
        if body.get("step"):
            parts.append({"url": "step", "valueString": str(body["step"])})
        if body.get("when"):
            parts.append({"url": "criteria", "valueExpression": _expr(body["when"])})
        if "timeout" not in body:
            p.add(f"step {sid} await", "needs a timeout (an ISO 8601 duration such as P2D)")
        parts.append({"url": "timeout", "valueDuration": _duration(body.get("timeout", "P1D"), f"step {sid}", p)})
        action["extension"] = [{"url": EXT + "wait-for", "extension": parts}]
        arms.append(_arm(sid, "event", spec.get("on-event"), ids=ids))
        arms.append(_arm(sid, "timeout", spec.get("on-timeout"), ids=ids))
    elif kind == "preference":
        body = body if isinstance(body, dict) else {}
        for label, target in body.items():
            arms.append(_arm(sid, str(label), str(target), ids=ids))
    elif kind == "update":
        body = body if isinstance(body, dict) else {}
        action["extension"] = [{"url": EXT + "update-target", "valueExpression": _expr(body.get("target", "%current"))}]
        action["dynamicValue"] = [{"path": str(k), "expression": _expr(v)} for k, v in (body.get("set") or {}).items()]
    if spec.get("on-error"):
        arms.append(_arm(sid, "error", str(spec["on-error"]), ids=ids))
    if arms:
        action["action"] = arms
    if spec.get("next") and (spec["next"] != "end" or "end" in ids):
        action["relatedAction"] = _related(str(spec["next"]), spec.get("after"), p, f"step {sid}")
    return action


def compile_journey(doc: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The YAML form (a parsed mapping) → (PlanDefinition, [ActivityDefinition])."""
    p = _Problems()
    if not isinstance(doc, dict) or not doc.get("journey"):
        raise InvalidJourney([("journey", "the document must be a mapping with 'journey: <name>'")])
    for key in sorted(set(doc) - TOP_KEYS):
        p.add(key, f"unknown key; known keys: {', '.join(sorted(TOP_KEYS))}")
    name = str(doc["journey"])
    url = str(doc.get("url") or JOURNEY_URL_BASE + name)
    version = str(doc.get("version") or "1.0.0")
    templates: list[dict[str, Any]] = []
    tpl_urls: dict[str, str] = {}
    for tname, spec in (doc.get("templates") or {}).items():
        tpl = _template(str(tname), spec, p, version)
        if tpl:
            templates.append(tpl)
            tpl_urls[str(tname)] = f"{tpl['url']}|{tpl['version']}"
    steps_spec = doc.get("steps") or []
    start: dict[str, Any] = {"id": "start", "title": "Start",
                             "code": [{"coding": [{"system": STEP_SYSTEM, "code": "start"}]}]}
    trig_specs = doc.get("trigger")
    trig_specs = trig_specs if isinstance(trig_specs, list) else [trig_specs]
    start["trigger"] = [t for s in trig_specs if (t := _trigger(s, p))]
    inputs = []
    for var, spec in (doc.get("data") or {}).items():
        spec = spec if isinstance(spec, dict) else {}
        req: dict[str, Any] = {"id": str(var), "type": str(spec.get("type") or "")}
        if spec.get("codes"):
            codings = [dict(zip(("system", "code"), str(c).split("|", 1), strict=True)) if "|" in str(c)
                       else {"code": str(c)} for c in spec["codes"]]
            req["codeFilter"] = [{"path": str(spec.get("path") or "code"), "code": codings}]
        inputs.append(req)
    if inputs:
        start["input"] = inputs
    if steps_spec:
        first = str(steps_spec[0].get("id") if isinstance(steps_spec[0], dict) else "")
        start["relatedAction"] = _related(first)
    ids = frozenset(str(s.get("id")) for s in steps_spec if isinstance(s, dict))
    actions = [start] + [a for i, s in enumerate(steps_spec) if (a := _step(s, i, p, tpl_urls, ids))]
    plan: dict[str, Any] = {
        "resourceType": "PlanDefinition", "id": str(doc.get("id") or _id_for(url, version)),
        "meta": {"profile": [PROFILE]}, "url": url, "version": version, "name": machine_name(name),
        "title": str(doc.get("title") or name), "status": str(doc.get("status") or "draft"),
        "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/plan-definition-type",
                             "code": "workflow-definition"}]},
        "usage": DISCLAIMER}
    if doc.get("description"):
        plan["description"] = str(doc["description"])
    if doc.get("copyright"):
        plan["copyright"] = str(doc["copyright"])
    extensions = _journey_extensions(doc, p)
    if extensions:
        plan["extension"] = extensions
    goal = doc.get("goal")
    if goal:
        g = goal if isinstance(goal, dict) else {"text": str(goal)}
        entry: dict[str, Any] = {"description": {"text": str(g.get("text") or "")}}
        if g.get("criteria"):
            entry["extension"] = [{"url": EXT + "journey-goal-criteria", "valueExpression": _expr(g["criteria"])}]
        plan["goal"] = [entry]
    plan["action"] = actions
    if p:
        raise InvalidJourney(p, label=f"journey {name}")
    return plan, templates


def _journey_extensions(doc: dict[str, Any], p: _Problems) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    reentry = doc.get("reentry")
    if reentry is not None:
        if isinstance(reentry, dict) and "after" in reentry:
            parts = [{"url": "policy", "valueCode": "after"},
                     {"url": "interval", "valueDuration": _duration(reentry["after"], "reentry", p)}]
        elif reentry in ("never", "always"):
            parts = [{"url": "policy", "valueCode": str(reentry)}]
        else:
            p.add("reentry", "is never, always or {after: <ISO duration>}")
            parts = []
        if parts:
            out.append({"url": EXT + "journey-reentry", "extension": parts})
    if doc.get("binding"):
        out.append({"url": EXT + "journey-binding", "valueExpression": _expr(doc["binding"])})
    if doc.get("exit"):
        out.append({"url": EXT + "journey-exit", "valueExpression": _expr(doc["exit"])})
    return out


# --- FHIR → YAML ---------------------------------------------------------------------------------------

def _code(element: dict[str, Any], system: str) -> str | None:
    for concept in element.get("code") or []:
        for coding in concept.get("coding") or []:
            if coding.get("system") == system:
                return str(coding.get("code"))
    return None


def _next(element: dict[str, Any]) -> tuple[str | None, str | None]:
    for rel in element.get("relatedAction") or []:
        if rel.get("relationship") == "before-start":
            delay = fhir_duration_to_iso(rel["offsetDuration"]) if rel.get("offsetDuration") else None
            return rel.get("actionId"), delay
    return None, None


def decompile(plan: dict[str, Any], templates: list[dict[str, Any]]) -> dict[str, Any]:
    """PlanDefinition + ActivityDefinitions → the YAML form (as a mapping, ready for ``yaml.safe_dump``)."""
    actions = plan.get("action") or []
    start = actions[0] if actions else {}
    name = author_name(plan, JOURNEY_URL_BASE)
    version = str(plan.get("version") or "")
    doc: dict[str, Any] = {"journey": name}
    if plan.get("url") != JOURNEY_URL_BASE + name:
        doc["url"] = plan.get("url")
    doc.update({"version": version, "title": plan.get("title"), "status": plan.get("status")})
    if plan.get("description"):
        doc["description"] = plan["description"]
    if plan.get("copyright"):
        doc["copyright"] = plan["copyright"]
    trigs = [_yaml_trigger(t) for t in start.get("trigger") or []]
    doc["trigger"] = trigs[0] if len(trigs) == 1 else trigs
    reentry = ext(plan, "journey-reentry")
    if reentry:
        parts = {e["url"]: e for e in reentry.get("extension") or []}
        policy = parts.get("policy", {}).get("valueCode")
        doc["reentry"] = ({"after": fhir_duration_to_iso(parts["interval"]["valueDuration"])}
                          if policy == "after" else policy)
    for key, extname in (("binding", "journey-binding"), ("exit", "journey-exit")):
        e = ext(plan, extname)
        if e:
            doc[key] = e["valueExpression"]["expression"]
    if plan.get("goal"):
        g = plan["goal"][0]
        goal: dict[str, Any] = {"text": (g.get("description") or {}).get("text", "")}
        crit = ext(g, "journey-goal-criteria")
        if crit:
            goal["criteria"] = crit["valueExpression"]["expression"]
        doc["goal"] = goal
    if start.get("input"):
        data: dict[str, Any] = {}
        for req in start["input"]:
            spec: dict[str, Any] = {"type": req.get("type")}
            for cf in req.get("codeFilter") or []:
                if cf.get("path", "code") != "code":
                    spec["path"] = cf["path"]
                spec["codes"] = [f"{c['system']}|{c['code']}" if c.get("system") else c["code"]
                                 for c in cf.get("code") or []]
            data[req["id"]] = spec
        doc["data"] = data
    by_canonical: dict[str, str] = {}
    tdocs: dict[str, Any] = {}
    for tpl in templates:
        tname = author_name(tpl, TEMPLATE_URL_BASE)
        by_canonical[f"{tpl.get('url')}|{tpl.get('version')}"] = tname
        by_canonical[str(tpl.get("url"))] = tname
        tdoc: dict[str, Any] = {"kind": "message" if tpl.get("kind") == "CommunicationRequest" else "task"}
        if tpl.get("url") != TEMPLATE_URL_BASE + tname:
            tdoc["url"] = tpl.get("url")
        if str(tpl.get("version")) != version:
            tdoc["version"] = tpl.get("version")
        if tpl.get("title") and tpl.get("title") != tname:
            tdoc["title"] = tpl["title"]
        texts = [e for e in tpl.get("extension") or [] if e.get("url") == EXT + "message-text"]
        if texts:
            variants = {}
            for e in texts:
                parts = {x["url"]: x for x in e.get("extension") or []}
                variants[parts["language"]["valueCode"]] = parts["text"]["valueString"]
            tdoc["text"] = variants["en"] if list(variants) == ["en"] else variants
        for dv in tpl.get("dynamicValue") or []:
            value = dv["expression"]["expression"]
            if dv["path"].startswith("var."):
                tdoc.setdefault("vars", {})[dv["path"][4:]] = value
                continue
            if dv["path"] == "title":
                tdoc["subject-line"] = value
                continue
            if dv["path"] == "actions" and ACTIONS_EXPR.fullmatch(value):
                tdoc["actions"] = dict(item.split("=", 1) for item in re.findall(r"'((?:[^'\\]|\\.)*)'", value))
                continue
            if (dv["path"] == "medium" and value.startswith("'") and value.endswith("'")) \
                    or (dv["path"] == "due" and value.startswith("'P")):
                value = value[1:-1]
            tdoc[dv["path"]] = value
        tdocs[tname] = tdoc
    if tdocs:
        doc["templates"] = tdocs
    doc["steps"] = [_yaml_step(a, by_canonical) for a in actions[1:]]
    return doc


def _yaml_trigger(t: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any]
    if t.get("type") == "named-event":
        out = {"topic": t.get("name")}
    elif t.get("type") == "periodic":
        rep = (t.get("timingTiming") or {}).get("repeat") or {}
        out = {"every": fhir_duration_to_iso({"value": rep.get("period"), "code": rep.get("periodUnit")}),
               "search": (ext(t, "trigger-search") or {}).get("valueString")}
    else:
        on = {"data-added": ["create"], "data-modified": ["update"]}.get(t.get("type", ""), ["create", "update"])
        out = {"type": (t.get("data") or [{}])[0].get("type"), "on": on}
    if t.get("condition"):
        out["when"] = t["condition"]["expression"]
    return out


def _yaml_step(a: dict[str, Any], by_canonical: dict[str, str]) -> dict[str, Any]:
    kind = _code(a, STEP_SYSTEM) or "end"
    out: dict[str, Any] = {"id": a.get("id")}
    if a.get("title"):
        out["title"] = a["title"]
    arms = {(_code(arm, ARM_SYSTEM) or arm.get("title") or arm.get("id")): arm for arm in a.get("action") or []}
    target = {label: _next(arm)[0] or "end" for label, arm in arms.items()}
    if kind == "branch":
        body = []
        for j, (label, arm) in enumerate(arms.items()):
            if label == "error":
                continue
            if arm.get("condition"):
                entry = {"when": arm["condition"][0]["expression"]["expression"], "goto": target[label]}
                if label != f"when{j + 1}":
                    entry = {"label": label, **entry}
                body.append(entry)
            else:
                body.append({"else": target[label]})
        out["branch"] = body
    elif kind in ("message", "task"):
        canon = str(a.get("definitionCanonical"))
        out[kind] = by_canonical.get(canon, canon)
    elif kind == "wait":
        until = ext(a, "wait-until")
        out["wait"] = {"until": until["valueExpression"]["expression"]} if until else \
            fhir_duration_to_iso(a["timingDuration"])
    elif kind == "await":
        parts = {e["url"]: e for e in (ext(a, "wait-for") or {}).get("extension") or []}
        body2: dict[str, Any] = {"event": parts.get("event", {}).get("valueCode")}
        if "step" in parts:
            body2["step"] = parts["step"]["valueString"]
        if "criteria" in parts:
            body2["when"] = parts["criteria"]["valueExpression"]["expression"]
        body2["timeout"] = fhir_duration_to_iso(parts["timeout"]["valueDuration"])
        out["await"] = body2
        out["on-event"] = target.get("event", "end")
        out["on-timeout"] = target.get("timeout", "end")
    elif kind == "preference":
        out["preference"] = {label: t for label, t in target.items() if label != "error"}
    elif kind == "update":
        out["update"] = {"target": (ext(a, "update-target") or {}).get("valueExpression", {}).get("expression"),
                         "set": {dv["path"]: dv["expression"]["expression"] for dv in a.get("dynamicValue") or []}}
    else:
        out["end"] = True
    if "error" in target:
        out["on-error"] = target["error"]
    nxt, delay = _next(a)
    if nxt:
        out["next"] = nxt
    if delay:
        out["after"] = delay
    return out

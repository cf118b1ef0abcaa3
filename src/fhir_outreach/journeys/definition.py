"""Journey definitions: an OutreachJourney ``PlanDefinition`` (and its ActivityDefinition templates) read
into an immutable ``Journey`` the runtime executes, with every rule checked before anything runs.

This is the one reader of the FHIR encoding described in ``docs/journeys.md``; the YAML compiler writes
that encoding and the runner only ever sees ``Journey``/``Step``. ``parse_journey`` raises
``InvalidJourney`` listing each problem with the step it is in: an unknown step target, an unparsable
FHIRPath, a cycle without a wait, a missing or wrong-kind template, a bad duration, an unknown trigger.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import isodate  # type: ignore[import-untyped]

from ..errors import InvalidJourney
from ..fhir.fhirpath import FhirPathError, check_syntax

BASE = "http://fhir-outreach.org"
PROFILE = f"{BASE}/StructureDefinition/OutreachJourney"
MESSAGE_PROFILE = f"{BASE}/StructureDefinition/OutreachMessage"
TASK_PROFILE = f"{BASE}/StructureDefinition/OutreachTask"
EXT = f"{BASE}/StructureDefinition/"
STEP_SYSTEM = f"{BASE}/CodeSystem/journey-step"
ARM_SYSTEM = f"{BASE}/CodeSystem/journey-arm"
CHANNEL_SYSTEM = f"{BASE}/CodeSystem/channel"
IDENTIFIER_SYSTEM = f"{BASE}/identifier/outreach"
RUN_SYSTEM = f"{BASE}/identifier/run"
JOURNEY_URL_BASE = f"{BASE}/journeys/"
TEMPLATE_URL_BASE = f"{BASE}/templates/"
FHIRPATH = "text/fhirpath"
UCUM = "http://unitsofmeasure.org"

STEP_KINDS = ("branch", "message", "task", "wait", "await", "preference", "update", "end")
AWAIT_EVENTS = ("read", "opened", "clicked", "replied", "completed", "change")
CHANNELS = ("portal", "email", "sms", "teams", "push")
PREFERENCE_ARMS = ("sms", "email", "portal", "none")
MESSAGE_PATHS = ("medium", "recipient", "payload", "category", "subject", "sender", "title", "actions")
TASK_PATHS = ("description", "owner", "code", "priority", "due", "focus")
INTERACTIONS = ("create", "update", "delete")
REENTRY = ("never", "always", "after")

# UCUM duration codes <-> ISO 8601 designators (FHIR Duration uses UCUM; the YAML form uses ISO 8601).
UCUM_UNITS = {"a": ("Y", "years"), "mo": ("M", "months"), "wk": ("W", "weeks"), "d": ("D", "days"),
              "h": ("H", "hours"), "min": ("M", "minutes"), "s": ("S", "seconds")}


# --- durations ------------------------------------------------------------------------------------------

def parse_iso_duration(text: str) -> timedelta | isodate.Duration:
    """An ISO 8601 duration (``P2D``, ``PT36H``, ``P1Y``); ValueError otherwise."""
    try:
        value = isodate.parse_duration(str(text))
    except (isodate.ISO8601Error, ValueError, TypeError) as exc:
        raise ValueError(f"{text!r} is not an ISO 8601 duration such as P2D or PT4H") from exc
    return value


def add_duration(moment: datetime, iso: str) -> datetime:
    """``moment`` + an ISO duration; years and months are calendar arithmetic (P1Y from 29 Feb → 28 Feb)."""
    result = moment + parse_iso_duration(iso)
    assert isinstance(result, datetime)
    return result


def fhir_duration_to_iso(duration: Mapping[str, Any]) -> str:
    """A FHIR ``Duration`` (UCUM code) as an ISO 8601 duration string."""
    code = str(duration.get("code") or duration.get("unit") or "")
    value = duration.get("value")
    if code not in UCUM_UNITS or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"Duration {dict(duration)!r} needs a non-negative value and a UCUM code "
                         f"({', '.join(UCUM_UNITS)})")
    number = int(value) if float(value).is_integer() else value
    designator = UCUM_UNITS[code][0]
    return f"PT{number}{designator}" if code in ("h", "min", "s") else f"P{number}{designator}"


def iso_to_fhir_duration(iso: str) -> dict[str, Any]:
    """An ISO 8601 duration as a FHIR ``Duration`` in one UCUM unit (the largest that keeps it whole)."""
    value = parse_iso_duration(iso)
    if isinstance(value, isodate.Duration):
        months = int(value.years) * 12 + int(value.months)
        rest = value.tdelta
        if rest:
            raise ValueError(f"{iso!r}: mixing years/months with days or times is not supported")
        if months % 12 == 0:
            return {"value": months // 12, "unit": "years", "system": UCUM, "code": "a"}
        return {"value": months, "unit": "months", "system": UCUM, "code": "mo"}
    if not float(value.total_seconds()).is_integer():
        raise ValueError(f"{iso!r} is not a whole number of seconds")
    seconds = int(value.total_seconds())
    for code, size in (("wk", 604800), ("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds % size == 0 and (seconds or code == "s"):
            return {"value": seconds // size, "unit": UCUM_UNITS[code][1], "system": UCUM, "code": code}
    raise ValueError(f"{iso!r} is not a whole number of seconds")


# --- the model the runtime sees -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Arm:
    label: str
    condition: str | None
    target: str | None


@dataclass(frozen=True, slots=True)
class WaitFor:
    event: str
    step: str | None
    criteria: str | None
    timeout: str  # ISO duration


@dataclass(frozen=True, slots=True)
class Step:
    id: str
    kind: str
    title: str = ""
    next: str | None = None
    delay: str | None = None  # ISO duration before ``next`` (relatedAction.offsetDuration)
    arms: tuple[Arm, ...] = ()
    template: str | None = None  # canonical of the ActivityDefinition
    wait: str | None = None  # ISO duration
    wait_until: str | None = None  # FHIRPath → dateTime
    wait_for: WaitFor | None = None
    update_target: str | None = None
    updates: tuple[tuple[str, str], ...] = ()

    def arm(self, label: str) -> Arm | None:
        return next((a for a in self.arms if a.label == label), None)

    def targets(self) -> list[str]:
        out = [self.next] if self.next else []
        return out + [a.target for a in self.arms if a.target]


@dataclass(frozen=True, slots=True)
class Trigger:
    kind: str  # topic | data | periodic
    topic: str | None = None
    type: str | None = None
    interactions: tuple[str, ...] = ()
    condition: str | None = None
    every: str | None = None  # ISO duration (periodic)
    search: str | None = None  # FHIR search (periodic)


@dataclass(frozen=True, slots=True)
class Input:
    name: str
    type: str
    codes: tuple[str, ...] = ()  # system|code
    path: str = "code"


@dataclass(frozen=True, slots=True)
class Template:
    url: str
    version: str
    name: str
    kind: str  # message | task
    values: tuple[tuple[str, str], ...]  # (path, FHIRPath); message variables are ``var.<name>``
    title: str = ""
    texts: tuple[tuple[str, str], ...] = ()  # (language, Liquid text) — the message body by language

    def variables(self) -> list[tuple[str, str]]:
        return [(p[4:], e) for p, e in self.values if p.startswith("var.")]

    @property
    def canonical(self) -> str:
        return f"{self.url}|{self.version}"

    def value(self, path: str) -> str | None:
        return next((e for p, e in self.values if p == path), None)


@dataclass(frozen=True, slots=True)
class Journey:
    url: str
    version: str
    name: str
    title: str
    status: str
    triggers: tuple[Trigger, ...]
    first: str | None
    steps: Mapping[str, Step]
    inputs: Mapping[str, Input] = field(default_factory=dict)
    templates: Mapping[str, Template] = field(default_factory=dict)  # by canonical url|version and url
    reentry: str = "never"
    reentry_interval: str | None = None
    binding: str | None = None
    exit: str | None = None
    goal: str = ""
    goal_criteria: str | None = None
    plan_id: str | None = None

    @property
    def canonical(self) -> str:
        return f"{self.url}|{self.version}"

    def template(self, ref: str) -> Template:
        return self.templates[ref]

    def expressions(self) -> list[tuple[str, str]]:
        """Every FHIRPath in the journey with where it sits (for syntax checks and input discovery)."""
        out: list[tuple[str, str]] = []
        for i, t in enumerate(self.triggers):
            if t.condition:
                out.append((f"trigger[{i}].condition", t.condition))
        for where, expr in (("binding", self.binding), ("exit", self.exit), ("goal", self.goal_criteria)):
            if expr:
                out.append((where, expr))
        for step in self.steps.values():
            out += _step_expressions(step)
        for tpl in {t.url: t for t in self.templates.values()}.values():
            out += [(f"template {tpl.name} {p}", e) for p, e in tpl.values]
        return out


def _step_expressions(step: Step) -> list[tuple[str, str]]:
    out = [(f"step {step.id} arm {a.label}", a.condition) for a in step.arms if a.condition]
    if step.wait_until:
        out.append((f"step {step.id} wait-until", step.wait_until))
    if step.wait_for and step.wait_for.criteria:
        out.append((f"step {step.id} wait-for criteria", step.wait_for.criteria))
    if step.update_target:
        out.append((f"step {step.id} update-target", step.update_target))
    out += [(f"step {step.id} set {p}", e) for p, e in step.updates]
    return out  # type: ignore[return-value]


# --- reading the FHIR encoding -------------------------------------------------------------------------

def is_journey(resource: Mapping[str, Any]) -> bool:
    return resource.get("resourceType") == "PlanDefinition" and PROFILE in ((resource.get("meta") or {})
                                                                              .get("profile") or [])


def is_template(resource: Mapping[str, Any]) -> bool:
    profiles = (resource.get("meta") or {}).get("profile") or []
    return resource.get("resourceType") == "ActivityDefinition" and (
        MESSAGE_PROFILE in profiles or TASK_PROFILE in profiles)


def ext(element: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    url = name if name.startswith("http") else EXT + name
    return next((e for e in element.get("extension") or [] if e.get("url") == url), None)


def _expression(value: Any, where: str, problems: list[tuple[str, str]]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("expression"), str):
        problems.append((where, "needs an Expression with a FHIRPath 'expression'"))
        return None
    if value.get("language") not in (None, FHIRPATH):
        problems.append((where, f"language {value.get('language')!r} is not supported; use text/fhirpath"))
        return None
    return str(value["expression"])


def _code(element: Mapping[str, Any], system: str) -> str | None:
    for concept in element.get("code") or []:
        for coding in (concept or {}).get("coding") or []:
            if coding.get("system") == system:
                return str(coding.get("code"))
    return None


def parse_template(resource: Mapping[str, Any], problems: list[tuple[str, str]] | None = None) -> Template:
    own = problems is None
    problems = [] if problems is None else problems
    name = str(resource.get("name") or resource.get("id") or "?")
    where = f"template {name}"
    kind = {"CommunicationRequest": "message", "Task": "task"}.get(str(resource.get("kind")))
    if kind is None:
        problems.append((where, f"kind {resource.get('kind')!r} is neither CommunicationRequest nor Task"))
        kind = "message"
    allowed = MESSAGE_PATHS if kind == "message" else TASK_PATHS
    values: list[tuple[str, str]] = []
    for dv in resource.get("dynamicValue") or []:
        path = str(dv.get("path") or "")
        if kind == "message" and path.startswith("var.") and path[4:].isidentifier():
            pass  # a variable of the Liquid text
        elif path not in allowed:
            problems.append((f"{where} dynamicValue {path}", f"unknown path; a {kind} template allows "
                             f"{', '.join(allowed)}"))
            continue
        expr = _expression(dv.get("expression"), f"{where} dynamicValue {path}", problems)
        if expr is not None:
            values.append((path, expr))
    if not resource.get("url"):
        problems.append((where, "has no url"))
    texts = _texts(resource, where, problems)
    if kind == "message" and not texts and not any(p == "payload" for p, _ in values):
        problems.append((where, "a message template needs a payload or a message-text"))
    tpl = Template(str(resource.get("url") or ""), str(resource.get("version") or ""), name, kind,
                   tuple(values), str(resource.get("title") or ""), texts)
    if own and problems:
        raise InvalidJourney(problems, label=f"ActivityDefinition {name}")
    for path, expr in tpl.values:
        _syntax(expr, f"{where} dynamicValue {path}", problems)
    if own and problems:
        raise InvalidJourney(problems, label=f"ActivityDefinition {name}")
    return tpl


def _texts(resource: Mapping[str, Any], where: str, problems: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The ``message-text`` extensions: one Liquid text per language (``language`` + ``text``)."""
    from liquid.exceptions import LiquidError

    from .texts import parse_liquid

    out: list[tuple[str, str]] = []
    for e in resource.get("extension") or []:
        if e.get("url") != EXT + "message-text":
            continue
        parts = {x.get("url"): x for x in e.get("extension") or []}
        language = str((parts.get("language") or {}).get("valueCode") or "")
        text = (parts.get("text") or {}).get("valueString")
        if not language or not isinstance(text, str):
            problems.append((f"{where} message-text", "needs a language (valueCode) and a text (valueString)"))
            continue
        try:
            parse_liquid(text)
        except LiquidError as exc:
            problems.append((f"{where} message-text {language}", f"Liquid: {str(exc).splitlines()[0]}"))
            continue
        out.append((language, text))
    return tuple(out)


def _syntax(expr: str, where: str, problems: list[tuple[str, str]]) -> None:
    try:
        check_syntax(expr)
    except FhirPathError as exc:
        problems.append((where, exc.reason + f" in {expr!r}"))


def _iso(duration: Any, where: str, problems: list[tuple[str, str]]) -> str | None:
    if duration is None:
        return None
    try:
        return fhir_duration_to_iso(duration)
    except (ValueError, AttributeError) as exc:
        problems.append((where, str(exc)))
        return None


def _target(action: Mapping[str, Any], where: str, problems: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    related = [r for r in action.get("relatedAction") or [] if r.get("relationship") == "before-start"]
    if len(related) > 1:
        problems.append((where, "has more than one next step (relatedAction before-start)"))
    if not related:
        return None, None
    rel = related[0]
    delay = _iso(rel.get("offsetDuration"), f"{where} offsetDuration", problems) \
        if rel.get("offsetDuration") else None
    return (str(rel.get("actionId")) if rel.get("actionId") else None), delay


def _trigger(t: Mapping[str, Any], i: int, problems: list[tuple[str, str]]) -> Trigger | None:
    where = f"trigger[{i}]"
    kind = t.get("type")
    condition = _expression(t.get("condition"), f"{where}.condition", problems)
    data = t.get("data") or []
    rtype = str(data[0].get("type")) if data and isinstance(data[0], dict) and data[0].get("type") else None
    if kind == "named-event":
        if not t.get("name"):
            problems.append((where, "a named-event trigger needs a name (a shipped topic)"))
            return None
        return Trigger("topic", topic=str(t["name"]), condition=condition)
    if kind in ("data-added", "data-modified", "data-changed"):
        if not rtype:
            problems.append((where, f"a {kind} trigger needs data[0].type (the resource type)"))
            return None
        inter = {"data-added": ("create",), "data-modified": ("update",), "data-changed": ("create", "update")}
        return Trigger("data", type=rtype, interactions=inter[str(kind)], condition=condition)
    if kind == "periodic":
        search = (ext(t, "trigger-search") or {}).get("valueString")
        repeat = (t.get("timingTiming") or {}).get("repeat") or {}
        every = None
        try:
            every = fhir_duration_to_iso({"value": repeat.get("period"), "code": repeat.get("periodUnit")})
        except ValueError as exc:
            problems.append((f"{where}.timingTiming", f"needs repeat.period and periodUnit: {exc}"))
        if not search or ("?" not in str(search) and not str(search).isalpha()):
            problems.append((where, "a periodic trigger needs the trigger-search extension (e.g. "
                                    "'Goal?lifecycle-status=active')"))
            return None
        return Trigger("periodic", type=str(search).split("?")[0], every=every, search=str(search),
                       condition=condition)
    problems.append((where, f"unknown trigger type {kind!r}"))
    return None


def _step(action: Mapping[str, Any], i: int, problems: list[tuple[str, str]]) -> Step | None:
    sid = action.get("id")
    where = f"step {sid or f'action[{i}]'}"
    if not sid:
        problems.append((where, "has no id"))
        return None
    kind = _code(action, STEP_SYSTEM)
    if kind not in STEP_KINDS:
        problems.append((where, f"unknown step kind {kind!r}; one of {', '.join(STEP_KINDS)}"))
        return None
    nxt, delay = _target(action, where, problems)
    arms: list[Arm] = []
    for j, arm in enumerate(action.get("action") or []):
        label = _code(arm, ARM_SYSTEM) or str(arm.get("title") or arm.get("id") or f"arm{j}")
        conds = arm.get("condition") or []
        cond = _expression(conds[0].get("expression"), f"{where} arm {label}", problems) if conds else None
        target, arm_delay = _target(arm, f"{where} arm {label}", problems)
        if arm_delay:
            problems.append((f"{where} arm {label}", "an arm cannot carry a delay; add a wait step"))
        arms.append(Arm(label, cond, target))
    fields: dict[str, Any] = {}
    if kind in ("message", "task"):
        fields["template"] = action.get("definitionCanonical")
        if not fields["template"]:
            problems.append((where, f"a {kind} step needs definitionCanonical (its ActivityDefinition)"))
    elif kind == "wait":
        fields["wait"] = _iso(action.get("timingDuration"), f"{where} timingDuration", problems) \
            if action.get("timingDuration") else None
        fields["wait_until"] = _expression((ext(action, "wait-until") or {}).get("valueExpression"),
                                           f"{where} wait-until", problems)
        if not fields["wait"] and not fields["wait_until"]:
            problems.append((where, "a wait step needs timingDuration or the wait-until extension"))
    elif kind == "await":
        fields["wait_for"] = _wait_for(action, where, problems)
    elif kind == "update":
        fields["update_target"] = _expression((ext(action, "update-target") or {}).get("valueExpression"),
                                              f"{where} update-target", problems)
        sets = []
        for dv in action.get("dynamicValue") or []:
            expr = _expression(dv.get("expression"), f"{where} dynamicValue {dv.get('path')}", problems)
            if dv.get("path") and expr:
                sets.append((str(dv["path"]), expr))
        fields["updates"] = tuple(sets)
        if not fields["update_target"] or not sets:
            problems.append((where, "an update step needs update-target and at least one dynamicValue"))
    return Step(str(sid), kind, str(action.get("title") or ""), nxt, delay, tuple(arms), **fields)


def _wait_for(action: Mapping[str, Any], where: str, problems: list[tuple[str, str]]) -> WaitFor | None:
    wf = ext(action, "wait-for")
    if wf is None:
        problems.append((where, "an await step needs the wait-for extension"))
        return None
    parts = {e.get("url"): e for e in wf.get("extension") or []}
    event = (parts.get("event") or {}).get("valueCode")
    if event not in AWAIT_EVENTS:
        problems.append((f"{where} wait-for", f"event {event!r} is not one of {', '.join(AWAIT_EVENTS)}"))
    timeout = _iso((parts.get("timeout") or {}).get("valueDuration"), f"{where} wait-for timeout", problems)
    if timeout is None and "timeout" not in parts:
        problems.append((f"{where} wait-for", "needs a timeout"))
    criteria = _expression((parts.get("criteria") or {}).get("valueExpression"), f"{where} wait-for criteria",
                           problems)
    step = (parts.get("step") or {}).get("valueString")
    if event != "change" and not step:
        problems.append((f"{where} wait-for", f"event {event!r} needs the step whose message or task it awaits"))
    return WaitFor(str(event), step, criteria, timeout or "PT0S")


def _inputs(plan: Mapping[str, Any], problems: list[tuple[str, str]]) -> dict[str, Input]:
    out: dict[str, Input] = {}
    for action in plan.get("action") or []:
        for req in action.get("input") or []:
            name = req.get("id")
            if not name or not str(name).isidentifier():
                problems.append((f"input {name!r}", "a data requirement needs an id usable as a variable name"))
                continue
            codes: list[str] = []
            path = "code"
            for cf in req.get("codeFilter") or []:
                path = str(cf.get("path") or "code")
                codes += [f"{c.get('system', '')}|{c.get('code')}" for c in cf.get("code") or []]
            if not req.get("type"):
                problems.append((f"input {name}", "has no type"))
                continue
            out[str(name)] = Input(str(name), str(req["type"]), tuple(codes), path)
    return out


def parse_journey(plan: Mapping[str, Any], templates: Mapping[str, Mapping[str, Any]] | None = None, *,
                  known_topics: set[str] | None = None) -> Journey:
    """Read and check an OutreachJourney. ``templates`` maps canonical ``url|version`` and bare ``url`` to
    ActivityDefinition JSON. Raises ``InvalidJourney`` with every problem found."""
    problems: list[tuple[str, str]] = []
    label = f"PlanDefinition {plan.get('url') or plan.get('id') or ''}".strip()
    if plan.get("resourceType") != "PlanDefinition":
        raise InvalidJourney([("resourceType", "a journey is a PlanDefinition")], label=label)
    for name in ("url", "version", "name"):
        if not plan.get(name):
            problems.append((name, "is required by the OutreachJourney profile"))
    actions = list(plan.get("action") or [])
    if not actions or not actions[0].get("trigger"):
        problems.append(("action[0]", "the first action must be the start, with at least one trigger"))
        start: Mapping[str, Any] = actions[0] if actions else {}
    else:
        start = actions[0]
    triggers = [tr for i, raw in enumerate(start.get("trigger") or []) if (tr := _trigger(raw, i, problems))]
    for t in triggers:
        if t.kind == "topic" and known_topics is not None and t.topic not in known_topics:
            problems.append(("trigger", f"named-event {t.topic!r} is not a shipped topic "
                                        f"(subscriptions/topics)"))
    first, _ = _target(start, "start", problems)
    steps: dict[str, Step] = {}
    duplicates: list[Step] = []
    for i, action in enumerate(actions[1:], start=1):
        step = _step(action, i, problems)
        if step is None:
            continue
        if step.id in steps or step.id == "start":
            problems.append((f"step {step.id}", "duplicate step id"))
            duplicates.append(step)  # still checked below, but not in the graph
            continue
        steps[step.id] = step
    reentry_ext = ext(plan, "journey-reentry") or {}
    parts = {e.get("url"): e for e in reentry_ext.get("extension") or []}
    reentry = (parts.get("policy") or {}).get("valueCode") or "never"
    if reentry not in REENTRY:
        problems.append(("journey-reentry", f"policy {reentry!r} is not one of {', '.join(REENTRY)}"))
    interval = _iso((parts.get("interval") or {}).get("valueDuration"), "journey-reentry interval", problems) \
        if parts.get("interval") else None
    if reentry == "after" and not interval:
        problems.append(("journey-reentry", "policy 'after' needs an interval"))
    goal = (plan.get("goal") or [{}])[0]
    resolved: dict[str, Template] = {}
    for step in steps.values():
        if step.template is None:
            continue
        if step.template in resolved:  # each template is parsed (and its problems reported) once
            if resolved[step.template].kind != step.kind:
                problems.append((f"step {step.id}", f"template {step.template!r} is a "
                                                    f"{resolved[step.template].kind} template, not a {step.kind} one"))
            continue
        raw = (templates or {}).get(step.template) or (templates or {}).get(step.template.split("|")[0])
        if raw is None:
            problems.append((f"step {step.id}", f"template {step.template!r} not found (load its "
                                                f"ActivityDefinition first or with the journey)"))
            continue
        tpl = parse_template(raw, problems)
        if tpl.kind != step.kind:
            problems.append((f"step {step.id}", f"template {step.template!r} is a {tpl.kind} template, "
                                                f"not a {step.kind} one"))
        resolved[step.template] = tpl
    journey = Journey(
        url=str(plan.get("url") or ""), version=str(plan.get("version") or ""), name=str(plan.get("name") or ""),
        title=str(plan.get("title") or ""), status=str(plan.get("status") or "draft"), triggers=tuple(triggers),
        first=first, steps=steps, inputs=_inputs(plan, problems), templates=resolved, reentry=reentry,
        reentry_interval=interval,
        binding=_expression((ext(plan, "journey-binding") or {}).get("valueExpression"), "journey-binding",
                            problems),
        exit=_expression((ext(plan, "journey-exit") or {}).get("valueExpression"), "journey-exit", problems),
        goal=str(((goal.get("description") or {}).get("text")) or ""),
        goal_criteria=_expression((ext(goal, "journey-goal-criteria") or {}).get("valueExpression"),
                                  "goal criteria", problems),
        plan_id=str(plan["id"]) if plan.get("id") else None)
    _check_graph(journey, problems)
    for where, expr in journey.expressions():
        if not where.startswith("template "):  # parse_template checked those
            _syntax(expr, where, problems)
    for dup in duplicates:
        for where, expr in _step_expressions(dup):
            _syntax(expr, where, problems)
    if problems:
        raise InvalidJourney(problems, label=label)
    return journey


def _check_graph(j: Journey, problems: list[tuple[str, str]]) -> None:
    if j.first is None and j.steps:
        problems.append(("start", "names no first step (relatedAction before-start)"))
    for where, target in [("start", j.first), *((f"step {s.id}", t) for s in j.steps.values()
                                                  for t in s.targets())]:
        if target and target not in j.steps:
            problems.append((where, f"goes to unknown step {target!r}"))
    for step in j.steps.values():
        labels = [a.label for a in step.arms]
        if step.kind == "await":
            if "event" not in labels and not step.next:
                problems.append((f"step {step.id}", "an await step needs an 'event' arm (or a next step)"))
            if step.wait_for and step.wait_for.step and step.wait_for.step not in j.steps:
                problems.append((f"step {step.id}", f"awaits unknown step {step.wait_for.step!r}"))
            elif step.wait_for and step.wait_for.step and \
                    j.steps[step.wait_for.step].kind not in ("message", "task"):
                problems.append((f"step {step.id}", f"awaits step {step.wait_for.step!r}, which is not a "
                                                    f"message or task step"))
        if step.kind == "preference":
            bad = [lbl for lbl in labels if lbl not in (*PREFERENCE_ARMS, "else", "error")]
            if bad:
                problems.append((f"step {step.id}", f"unknown preference arm(s) {', '.join(bad)}"))
        if step.kind == "branch" and not step.arms:
            problems.append((f"step {step.id}", "a branch needs at least one arm"))
    # A cycle must pass through a wait, an await, or a delayed edge, or a run could loop forever at once.
    instant: dict[str, list[str]] = {}
    for s in j.steps.values():
        if s.kind in ("wait", "await"):
            continue
        instant[s.id] = [a.target for a in s.arms if a.target] + ([s.next] if s.next and not s.delay else [])
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in instant.get(node, []):
            if nxt not in instant:
                continue
            if state.get(nxt) == 1:
                cycle = [*trail[trail.index(nxt):], nxt] if nxt in trail else [node, nxt]
                problems.append((f"step {nxt}", f"cycle without a wait: {' -> '.join(cycle)}"))
            elif not state.get(nxt):
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in instant:
        if not state.get(node):
            visit(node, [node])


def lint(journey: Journey) -> list[str]:
    """Warnings (not errors): SMS or email texts that read clinical data (PHI minimisation)."""
    from .texts import lint as lint_text

    out: list[str] = []
    for tpl in {t.url: t for t in journey.templates.values()}.values():
        if tpl.kind != "message":
            continue
        medium_expr = (tpl.value("medium") or "").strip()
        literal = medium_expr.strip("'") if medium_expr.startswith("'") and medium_expr.count("'") == 2 else None
        if literal not in (None, "sms", "email"):
            continue
        expressions = [e for p, e in tpl.values if p == "payload" or p.startswith("var.")]
        out += [f"template {tpl.name}: {w}" for w in lint_text(literal, expressions, list(journey.inputs))]
    return out

"""Normalise every notification shape real FHIR servers send into ``Draft`` events (pure, no I/O).

One function per source shape, dispatched by ``normalize``: R4 classic rest-hook (PUT/DELETE of
``Type/id`` with the resource, or an empty POST), topic-based notification Bundles (R4 backport with a
``Parameters`` status, R4B ``SubscriptionStatus``, R5 ``subscription-notification``; handshake, heartbeat,
event-notification, query-status, query-event; empty / id-only / full-resource payloads), Medplum's bare
resource with ``X-Medplum-*`` headers, and Azure Event Grid events (Event Grid and CloudEvents schemas).
Known quirks are absorbed here: HAPI's date-only timestamp, its doubled type prefix in ``focus`` and its
transaction-typed Bundles. Anything that cannot be read raises ``MalformedNotification`` naming the place.
The inbox processor turns drafts into stored events, fetching resources that were not included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ..fhir.searchparams import RESOURCE_TYPES

Interaction = Literal["create", "update", "delete"]
Kind = Literal["event", "handshake", "heartbeat", "query-status", "poll", "validation"]

_NOTIFICATION_TYPES = {"handshake", "heartbeat", "event-notification", "query-status", "query-event"}
_REF_RE = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/([A-Za-z0-9\-.]+))?/?$")
_EVENTGRID_TYPES = {
    "Microsoft.HealthcareApis.FhirResourceCreated": "create",
    "Microsoft.HealthcareApis.FhirResourceUpdated": "update",
    "Microsoft.HealthcareApis.FhirResourceDeleted": "delete",
}
EVENTGRID_VALIDATION = "Microsoft.EventGrid.SubscriptionValidationEvent"


class MalformedNotification(ValueError):
    """A notification that cannot be understood; ``where`` names the element."""

    def __init__(self, message: str, where: str = "body") -> None:
        super().__init__(message)
        self.where = where


@dataclass
class Draft:
    """One normalised notification item, before dedup, ordering and read-back."""

    kind: Kind
    shape: str
    interaction: Interaction | None = None
    focus: str | None = None  # "Type/id" (local to the source)
    version: str | None = None
    resource: dict[str, Any] | None = None
    event_number: int | None = None
    events_since_start: int | None = None
    timestamp: str | None = None
    topic: str | None = None
    subscription: str | None = None  # the source's Subscription reference, when the shape says
    status: str | None = None  # subscription status reported by the source
    source_event_id: str | None = None  # Event Grid / CloudEvents id
    context: list[str] = field(default_factory=list)  # additional-context references
    validation_code: str | None = None
    validation_url: str | None = None
    errors: list[str] = field(default_factory=list)  # errors the source reported in a status

    @property
    def needs_fetch(self) -> bool:
        return self.kind == "event" and self.interaction != "delete" and self.resource is None

    @property
    def focus_type(self) -> str | None:
        return self.focus.split("/", 1)[0] if self.focus else None


def parse_reference(ref: str) -> tuple[str, str, str | None]:
    """(Type, id, version) of a literal reference, absolute or relative, tolerating HAPI's doubled
    ``Encounter/Encounter/123`` prefix; raises MalformedNotification."""
    text = ref.strip()
    m = _REF_RE.search(text)
    if not m:
        raise MalformedNotification(f"cannot read the reference {ref!r}", "focus")
    return m.group(1), m.group(2), m.group(3)


def _int(value: Any, where: str) -> int | None:
    if value is None:
        return None
    try:
        return int(str(value))  # integer64 values arrive as strings
    except ValueError as exc:
        raise MalformedNotification(f"{where} must be an integer, got {value!r}", where) from exc


def _version_of(resource: dict[str, Any]) -> str | None:
    meta = resource.get("meta")
    if isinstance(meta, dict) and meta.get("versionId") is not None:
        return str(meta["versionId"])
    return None


def _interaction_for_version(version: str | None) -> Interaction:
    return "create" if version == "1" else "update"


def _check_resource(body: Any, where: str) -> dict[str, Any]:
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise MalformedNotification(f"{where} is not a FHIR resource (no resourceType)", where)
    return body


# --- R4 classic rest-hook ------------------------------------------------------------------------

def classic_put(type_: str, id_: str, body: Any) -> list[Draft]:
    """HAPI with a payload: ``PUT {endpoint}/{Type}/{id}`` carrying the resource."""
    resource = _check_resource(body, "body")
    if resource["resourceType"] != type_:
        raise MalformedNotification(f"body is a {resource['resourceType']} but the URL names {type_}", "resourceType")
    if resource.get("id") not in (None, id_):
        raise MalformedNotification(f"body id {resource.get('id')!r} differs from the URL id {id_!r}", "id")
    version = _version_of(resource)
    return [Draft("event", "r4-classic", _interaction_for_version(version), f"{type_}/{id_}", version,
                  {**resource, "id": id_})]


def classic_delete(type_: str, id_: str) -> list[Draft]:
    return [Draft("event", "r4-classic", "delete", f"{type_}/{id_}")]


def classic_empty() -> list[Draft]:
    """HAPI without a payload: an empty POST only says "something matched" → search the source."""
    return [Draft("poll", "r4-classic-empty")]


# --- topic-based notification Bundles ----------------------------------------------------------------

def _param_value(param: dict[str, Any]) -> Any:
    for key, value in param.items():
        if key.startswith("value"):
            return value
    return None


def _status_from_parameters(res: dict[str, Any]) -> dict[str, Any]:
    """The R4 backport ``Parameters`` status flattened into SubscriptionStatus field names."""
    out: dict[str, Any] = {"notificationEvent": []}
    names = {"subscription": "subscription", "topic": "topic", "status": "status", "type": "type",
             "events-since-subscription-start": "eventsSinceSubscriptionStart", "error": "error"}
    for p in res.get("parameter") or []:
        if not isinstance(p, dict):
            continue
        name = p.get("name")
        if name == "notification-event":
            event: dict[str, Any] = {"additionalContext": []}
            for part in p.get("part") or []:
                pname, value = part.get("name"), _param_value(part)
                if pname == "event-number":
                    event["eventNumber"] = value
                elif pname == "timestamp":
                    event["timestamp"] = value
                elif pname == "focus":
                    event["focus"] = value
                elif pname == "additional-context":
                    event["additionalContext"].append(value)
            out["notificationEvent"].append(event)
        elif name in names:
            key = names[name]
            value = _param_value(p)
            if key == "error":
                out.setdefault("error", []).append(value)
            else:
                out[key] = value
    return out


def _shape_of(bundle: dict[str, Any], status_res: dict[str, Any]) -> str:
    if status_res.get("resourceType") == "Parameters":
        return "r4-backport"
    # R4B notifications are ``history`` Bundles; R5 ones ``subscription-notification``, or ``transaction``
    # from HAPI R5 (hapi-fhir #5208), so anything but ``history`` is R5.
    return "r4b" if bundle.get("type") == "history" else "r5"


def _ref_text(value: Any) -> str | None:
    if isinstance(value, dict):
        ref = value.get("reference")
        return ref if isinstance(ref, str) else None
    return value if isinstance(value, str) else None


def _entry_ref(entry: dict[str, Any]) -> str | None:
    """Which resource a payload entry is about: its resource, fullUrl or request url."""
    res = entry.get("resource")
    if isinstance(res, dict) and isinstance(res.get("id"), str) and isinstance(res.get("resourceType"), str):
        return f"{res['resourceType']}/{res['id']}"
    for candidate in (entry.get("fullUrl"), (entry.get("request") or {}).get("url")):
        if isinstance(candidate, str) and not candidate.startswith("urn:"):
            return candidate
    return None


def notification_bundle(bundle: dict[str, Any]) -> list[Draft]:
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries:
        raise MalformedNotification("a notification Bundle needs its status as entry[0]", "Bundle.entry")
    status_res = entries[0].get("resource") if isinstance(entries[0], dict) else None
    if not isinstance(status_res, dict) or status_res.get("resourceType") not in ("Parameters", "SubscriptionStatus"):
        raise MalformedNotification("Bundle.entry[0].resource must be a SubscriptionStatus (or the R4 backport "
                                    "Parameters form)", "Bundle.entry[0].resource")
    status = _status_from_parameters(status_res) if status_res["resourceType"] == "Parameters" else status_res
    shape = _shape_of(bundle, status_res)
    ntype = status.get("type")
    if ntype not in _NOTIFICATION_TYPES:
        raise MalformedNotification(f"unknown notification type {ntype!r}", "SubscriptionStatus.type")
    common: dict[str, Any] = {
        "shape": shape, "topic": status.get("topic"), "status": status.get("status"),
        "subscription": _ref_text(status.get("subscription")),
        "events_since_start": _int(status.get("eventsSinceSubscriptionStart"), "eventsSinceSubscriptionStart"),
        "errors": [str(e.get("text") or e.get("coding") or e) if isinstance(e, dict) else str(e)
                   for e in status.get("error") or []],
    }
    if ntype in ("handshake", "heartbeat", "query-status"):
        return [Draft(ntype, **common)]  # type: ignore[arg-type]
    # Index the payload entries by Type/id so each event finds its resource (full-resource) or method.
    payload: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(entries[1:], start=1):
        if not isinstance(entry, dict):
            raise MalformedNotification(f"Bundle.entry[{i}] is not an object", f"Bundle.entry[{i}]")
        ref = _entry_ref(entry)
        if ref is not None:
            try:
                t, rid, _ = parse_reference(ref)
            except MalformedNotification:
                continue
            payload[f"{t}/{rid}"] = entry
    drafts = []
    events = status.get("notificationEvent") or []
    if not events:  # empty payload: the server says only that something happened
        return [Draft("poll", **common)]
    for n, event in enumerate(events):
        focus_ref = _ref_text(event.get("focus"))
        number = _int(event.get("eventNumber"), f"notificationEvent[{n}].eventNumber")
        if focus_ref is None:
            drafts.append(Draft("poll", event_number=number, timestamp=event.get("timestamp"), **common))
            continue
        t, rid, ver = parse_reference(focus_ref)
        entry = payload.get(f"{t}/{rid}", {})
        resource = entry.get("resource") if isinstance(entry.get("resource"), dict) else None
        method = ((entry.get("request") or {}).get("method") or "").upper()
        version = ver or (_version_of(resource) if resource else None)
        # Without a payload entry and a version, the read-back decides create vs update (processor).
        interaction: Interaction | None = (
            "delete" if method == "DELETE" else "create" if method == "POST" else "update" if method == "PUT"
            else _interaction_for_version(version) if version is not None else None)
        context = [c for c in (_ref_text(x) for x in event.get("additionalContext") or []) if c]
        drafts.append(Draft("event", interaction=interaction, focus=f"{t}/{rid}", version=version,
                            resource=resource if interaction != "delete" else None, event_number=number,
                            timestamp=str(event["timestamp"]) if event.get("timestamp") else None,
                            context=context, **common))
    return drafts


# --- Medplum ---------------------------------------------------------------------------------------

def medplum(body: Any, headers: dict[str, str]) -> list[Draft]:
    """A bare resource (``{}`` for a delete) with ``X-Medplum-Interaction`` / ``-Deleted-Resource`` and
    ``-Subscription`` (the Subscription id, kept as ``Subscription/{id}``); without the Medplum headers the
    interaction follows ``meta.versionId``."""
    interaction = (headers.get("x-medplum-interaction") or "").lower()
    sub_header = (headers.get("x-medplum-subscription") or "").strip()
    subscription = (sub_header if "/" in sub_header else f"Subscription/{sub_header}") if sub_header else None
    if interaction == "delete":
        deleted = headers.get("x-medplum-deleted-resource")
        if not deleted:
            raise MalformedNotification("a Medplum delete needs the X-Medplum-Deleted-Resource header",
                                        "X-Medplum-Deleted-Resource")
        t, rid, _ = parse_reference(deleted)
        return [Draft("event", "medplum", "delete", f"{t}/{rid}", subscription=subscription)]
    resource = _check_resource(body, "body")
    if not isinstance(resource.get("id"), str):
        raise MalformedNotification("the resource has no id", "id")
    version = _version_of(resource)
    if interaction not in ("create", "update"):
        interaction = _interaction_for_version(version)
    return [Draft("event", "medplum" if subscription else "resource", interaction,  # type: ignore[arg-type]
                  f"{resource['resourceType']}/{resource['id']}", version, resource, subscription=subscription)]


# --- Azure Event Grid ------------------------------------------------------------------------------

def _eventgrid_one(event: Any, i: int, cloud: bool) -> Draft:
    where = f"event[{i}]"
    if not isinstance(event, dict):
        raise MalformedNotification(f"{where} is not an object", where)
    etype = event.get("type" if cloud else "eventType")
    if etype == EVENTGRID_VALIDATION:
        data = event.get("data") or {}
        return Draft("validation", "eventgrid", validation_code=data.get("validationCode"),
                     validation_url=data.get("validationUrl"), source_event_id=event.get("id"))
    if etype not in _EVENTGRID_TYPES:
        raise MalformedNotification(f"{where}: unsupported event type {etype!r}", f"{where}.eventType")
    data = event.get("data")
    if not isinstance(data, dict) or not data.get("resourceType") or not data.get("resourceFhirId"):
        raise MalformedNotification(f"{where}.data needs resourceType and resourceFhirId", f"{where}.data")
    rtype, rid = str(data["resourceType"]), str(data["resourceFhirId"])
    version = str(data["resourceVersionId"]) if data.get("resourceVersionId") is not None else None
    return Draft("event", "cloudevents" if cloud else "eventgrid", _EVENTGRID_TYPES[etype],  # type: ignore[arg-type]
                 f"{rtype}/{rid}", version, timestamp=event.get("time" if cloud else "eventTime"),
                 source_event_id=str(event.get("id")) if event.get("id") else None)


def eventgrid(body: Any) -> list[Draft]:
    events = body if isinstance(body, list) else [body]
    if not events:
        raise MalformedNotification("an empty Event Grid array", "body")
    out = []
    for i, event in enumerate(events):
        cloud = isinstance(event, dict) and "specversion" in event
        out.append(_eventgrid_one(event, i, cloud))
    return out


def is_eventgrid(body: Any) -> bool:
    if isinstance(body, list):
        return True
    return isinstance(body, dict) and ("specversion" in body or "eventType" in body) and "resourceType" not in body


# --- dispatch ----------------------------------------------------------------------------------------

def normalize(method: str, path: list[str], body: Any, headers: dict[str, str]) -> list[Draft]:
    """Drafts for one delivery: ``method``, the path below ``/hooks/{key}``, parsed JSON body (or None for
    an empty one) and lower-case headers."""
    if path:
        if len(path) != 2 or (path[0] not in RESOURCE_TYPES and not path[0][:1].isupper()):
            raise MalformedNotification(f"expected /hooks/{{key}}/{{Type}}/{{id}}, got /{'/'.join(path)}", "url")
        type_, id_ = path
        if method == "DELETE":
            return classic_delete(type_, id_)
        if method in ("PUT", "POST"):
            if body is None:
                raise MalformedNotification(f"{method} /{type_}/{id_} carries no resource", "body")
            return classic_put(type_, id_, body)
        raise MalformedNotification(f"{method} is not a notification method", "method")
    if method != "POST":
        raise MalformedNotification(f"{method} /hooks/{{key}} is not a notification", "method")
    if body is None:
        return classic_empty()
    if is_eventgrid(body):
        return eventgrid(body)
    if headers.get("x-medplum-interaction", "").lower() == "delete":
        return medplum(body, headers)  # Medplum sends ``{}`` as the body of a delete
    resource = _check_resource(body, "body")
    if resource["resourceType"] == "Bundle":
        btype = resource.get("type")
        entries = resource.get("entry") or []
        first = entries[0].get("resource", {}) if entries and isinstance(entries[0], dict) else {}
        if isinstance(first, dict) and first.get("resourceType") in ("Parameters", "SubscriptionStatus"):
            return notification_bundle(resource)
        raise MalformedNotification(f"a Bundle of type {btype!r} without a SubscriptionStatus is not a "
                                    "notification", "Bundle.entry[0]")
    return medplum(resource, headers)

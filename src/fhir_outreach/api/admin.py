"""Operator endpoints under ``/admin``: hooks, the inbox (with rejected evidence), events, recoveries,
audit records and counts per source and state. JSON (not FHIR resources); errors are OperationOutcomes.
Needs a static API token or the ``system/*.*`` scope."""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from ..errors import InvalidRequest, NotFound
from ..fhir.validation import parse_json
from ..intake import inbox
from ..intake.hooks import HOOK, Hook
from ..intake.processor import AUDIT, EVENT, RECOVERY
from ..store.base import Record
from .http import fhir_response, read_body

router = APIRouter(prefix="/admin")
KINDS = {"inbox": inbox.INBOX, "events": EVENT, "recoveries": RECOVERY, "audit": AUDIT, "hooks": HOOK,
         "outbox": "outbox", "deliveries": "delivery"}


async def _admin(request: Request) -> None:
    principal = await request.app.state.authenticator.authenticate(request.headers.get("authorization"))
    principal.require_admin()


def _json(body: Any, status: int = 200) -> Response:
    return fhir_response(body, status, media_type="application/json")


def _int(request: Request, name: str, default: int, maximum: int = 1000) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) > maximum:
        raise InvalidRequest(f"'{name}' must be an integer from 0 to {maximum}", expression=[name])
    return int(raw)


def hook_view(hook: Hook, registry: Any) -> dict[str, Any]:
    data = hook.to_data()
    data.pop("secret_hash", None)
    return {"key": hook.key, "endpoint": registry.endpoint(hook.key), **data}


def record_view(rec: Record) -> dict[str, Any]:
    if rec.kind == inbox.INBOX:
        return inbox.summary(rec)
    out = {"key": rec.key, "state": rec.state, "source": rec.group, "attempts": rec.attempts,
           "created": rec.created, "updated": rec.updated}
    data = dict(rec.data)
    if rec.kind == EVENT:
        data.pop("resource", None)
        data.pop("previous", None)
    return {**out, **data}


@router.get("/counts")
async def counts(request: Request) -> Response:
    await _admin(request)
    store = request.app.state.store
    out: dict[str, list[dict[str, Any]]] = {}
    for name, kind in KINDS.items():
        rows = await store.count_records(kind)
        out[name] = [{"source": g, "state": st, "count": n} for (g, st), n in sorted(rows.items())]
    return _json(out)


@router.get("/hooks")
async def list_hooks(request: Request) -> Response:
    await _admin(request)
    registry = request.app.state.hooks
    return _json({"hooks": [hook_view(h, registry) for h in await registry.all()]})


@router.post("/hooks")
async def create_hook(request: Request) -> Response:
    await _admin(request)
    body = parse_json(await read_body(request, request.app.state.settings.max_body_bytes))
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object describing the hook")
    registry = request.app.state.hooks
    sources = {s.name for s in request.app.state.settings.sources}
    source = body.get("source")
    if source not in sources:
        raise InvalidRequest(f"'source' must name a configured source ({', '.join(sorted(sources)) or 'none'})",
                             expression=["source"])
    allowed = {"mode", "criteria", "topic", "resource_type", "payload", "remote_id", "heartbeat_period",
               "require_signature", "trigger", "source"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})",
                             expression=unknown)
    mode = body.get("mode", "any")
    if mode not in ("classic", "topic", "medplum", "eventgrid", "any"):
        raise InvalidRequest("'mode' must be classic, topic, medplum, eventgrid or any", expression=["mode"])
    fields = {k: v for k, v in body.items() if k != "source"}
    hook, secret = await registry.create(Hook(key=secrets.token_urlsafe(24), source=str(source), **fields))
    return _json({**hook_view(hook, registry), "secret": secret,
                  "channel_header": f"Authorization: Bearer {secret}"}, 201)


@router.post("/subscriptions/sync")
async def subscriptions_sync(request: Request) -> Response:
    await _admin(request)
    from ..intake.provisioning import Provisioner

    intake = request.app.state.intake
    actions = await Provisioner(request.app.state.store, intake.hooks, intake.sources).sync(
        request.app.state.settings.sources)
    return _json({"actions": [vars(a) for a in actions]})


# --- journeys and runs ----------------------------------------------------------------------------------

@router.get("/journeys")
async def list_journeys(request: Request) -> Response:
    await _admin(request)
    from ..journeys import catalog
    from ..journeys.runner import RUN

    store = request.app.state.store
    counts = await store.count_records(RUN)
    out = []
    for plan in sorted(await catalog.journeys(store), key=lambda p: (str(p.get("url")), str(p.get("version")))):
        canonical = f"{plan.get('url')}|{plan.get('version')}"
        control = await store.get_record(catalog.CONTROL, str(plan.get("url")))
        out.append({"url": plan.get("url"), "version": plan.get("version"), "name": plan.get("name"),
                    "title": plan.get("title"), "status": plan.get("status"), "id": plan.get("id"),
                    "control": control.state if control else "running",
                    "runs": {st: n for (g, st), n in counts.items() if g == canonical}})
    return _json({"journeys": out})


@router.post("/journeys")
async def load_journey(request: Request) -> Response:
    """Check and store a journey: the YAML form (``application/yaml``) or FHIR JSON (a PlanDefinition, or a
    Bundle with it and its ActivityDefinitions). ``?validate=true`` only checks; ``?activate=true`` stores
    it active."""
    await _admin(request)
    from ..journeys import catalog
    from ..journeys.definition import lint
    from ..journeys.files import parse_text

    body = await read_body(request, request.app.state.settings.max_body_bytes)
    plan, templates = parse_text(body, name="request body")
    store = request.app.state.store
    if request.query_params.get("activate") == "true":
        plan = {**plan, "status": "active"}
    if request.query_params.get("validate") == "true":
        journey = await catalog.check_journey(store, plan, templates)
        return _json({"valid": True, "journey": journey.canonical, "steps": len(journey.steps),
                      "warnings": lint(journey)})
    journey, report = await catalog.load(store, plan, templates, base_url=request.app.state.settings.fhir_base)
    request.app.state.journeys.catalog.invalidate()
    return _json({"journey": journey.canonical, "status": plan.get("status"), "written": report,
                  "warnings": lint(journey)}, 201)


@router.get("/journeys/{name}/export")
async def export_journey(request: Request, name: str) -> Response:
    await _admin(request)
    from ..journeys import catalog
    from ..journeys.files import dump

    store = request.app.state.store
    found = await catalog.find_canonical(store, "PlanDefinition", catalog.resolve_url(name),
                                         request.query_params.get("version"))
    if not found:
        raise NotFound(f"no journey {catalog.resolve_url(name)}")
    templates = list((await catalog.templates_for(store, found[0])).values())
    fmt = request.query_params.get("format", "yaml")
    if fmt not in ("yaml", "json"):
        raise InvalidRequest("'format' must be yaml or json", expression=["format"])
    text = dump(found[0], templates, fmt)
    return Response(text, media_type="application/yaml" if fmt == "yaml" else "application/fhir+json")


@router.post("/journeys/{name}/{action}")
async def control_journey(request: Request, name: str, action: str) -> Response:
    await _admin(request)
    from ..journeys import catalog

    store = request.app.state.store
    url = catalog.resolve_url(name)
    version = request.query_params.get("version")
    if action in ("activate", "retire"):
        done = await catalog.set_status(store, url, version, "active" if action == "activate" else "retired")
        request.app.state.journeys.catalog.invalidate()
        return _json({"journey": url, "written": done})
    states = {"pause": "paused", "resume": "running", "stop": "stopped"}
    if action not in states:
        raise NotFound(f"no journey action {action!r} (have: activate, retire, pause, resume, stop)")
    state = await catalog.set_control(store, url, states[action])
    request.app.state.journeys.wake()
    return _json({"journey": url, "control": state})


@router.get("/runs")
async def list_runs(request: Request) -> Response:
    await _admin(request)
    from ..journeys import catalog
    from ..journeys.runner import RUN

    store = request.app.state.store
    group = None
    if request.query_params.get("journey"):
        found = await catalog.find_canonical(store, "PlanDefinition",
                                             catalog.resolve_url(request.query_params["journey"]),
                                             request.query_params.get("version"))
        group = f"{found[0]['url']}|{found[0]['version']}" if found else "-"
    state = request.query_params.get("state")
    if state not in (None, "pending", "waiting", "awaiting", "held", "done"):
        raise InvalidRequest("'state' must be pending, waiting, awaiting, held or done", expression=["state"])
    records = await store.list_records(RUN, state=state, group=group, limit=_int(request, "limit", 50),
                                       offset=_int(request, "offset", 0, 10**9))
    return _json({"runs": [{"run": r.key, "state": r.state, "status": r.data.get("status"),
                            "journey": r.data.get("canonical"), "patient": r.data.get("patient"),
                            "step": r.data.get("step"), "due": r.due, "attempts": r.attempts,
                            "retry": r.data.get("retry")} for r in records]})


@router.get("/runs/{run_id}")
async def run_why(request: Request, run_id: str) -> Response:
    """Why a run took its path (JSON); ``?format=text`` gives the same transcript as ``journey why``."""
    await _admin(request)
    from ..journeys.explain import render, why

    w = await why(request.app.state.store, run_id)
    if request.query_params.get("format") == "text":
        return Response(render(w), media_type="text/plain; charset=utf-8")
    return _json(w)


@router.get("/{name}")
async def list_records(request: Request, name: str) -> Response:
    await _admin(request)
    if name not in KINDS:
        raise NotFound(f"no admin listing {name!r} (have: {', '.join(KINDS)}, counts)")
    records = await request.app.state.store.list_records(
        KINDS[name], state=request.query_params.get("state"), group=request.query_params.get("source"),
        limit=_int(request, "limit", 50), offset=_int(request, "offset", 0, 10**9))
    return _json({name: [record_view(r) for r in records]})


@router.get("/inbox/{key}")
async def inbox_item(request: Request, key: str) -> Response:
    await _admin(request)
    rec = await request.app.state.store.get_record(inbox.INBOX, key)
    if rec is None:
        raise NotFound(f"no inbox item {key}")
    return _json({**inbox.summary(rec), "headers": rec.data.get("headers"), "body": rec.data.get("body")})


@router.get("/events/{key:path}")
async def event_item(request: Request, key: str) -> Response:
    await _admin(request)
    rec = await request.app.state.store.get_record(EVENT, key)
    if rec is None:
        raise NotFound(f"no event {key}")
    return _json({"key": rec.key, "state": rec.state, **rec.data})

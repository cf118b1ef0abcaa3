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
KINDS = {"inbox": inbox.INBOX, "events": EVENT, "recoveries": RECOVERY, "audit": AUDIT, "hooks": HOOK}


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

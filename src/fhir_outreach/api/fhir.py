"""The FHIR REST facade under ``/fhir``: thin routes that frame HTTP around ``interactions``.

Each route authenticates, negotiates the format, reads the body within the configured limit, calls one
interaction and renders the result (ETag, Location, Last-Modified, ``Prefer: return=``). Errors are
raised as ``errors.*`` and rendered as OperationOutcomes by the handler in ``api.app``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response

from ..auth import Access, Principal
from ..errors import InvalidRequest, NotFound, NotSupported, UnsupportedMediaType
from ..fhir.validation import parse_json
from .bundles import BundleProcessor
from .http import FHIR_JSON, fhir_response, prefer, read_body, require_json, response_type
from .interactions import Interactions, Result, check_type
from .routing import FastRouter

router = FastRouter(prefix="/fhir")


def _ix(request: Request) -> Interactions:
    return request.app.state.interactions


async def _principal(request: Request, type_: str | None, access: Access) -> Principal:
    principal: Principal = await request.app.state.authenticator.authenticate(request.headers.get("authorization"))
    if type_ is not None:
        principal.require(type_, access)
    return principal


def _strict(request: Request) -> bool:
    return prefer(request).get("handling") == "strict"


def _render_write(request: Request, result: Result, media: str) -> Response:
    mode = prefer(request).get("return", "representation")
    if result.status == 204 or result.stored is None:
        return fhir_response(None, 204 if result.status == 204 else result.status, result.headers)
    if mode == "minimal":
        return fhir_response(None, result.status, result.headers)
    if mode == "OperationOutcome":
        s = result.stored
        outcome = {"resourceType": "OperationOutcome", "issue": [{
            "severity": "information", "code": "informational",
            "diagnostics": f"{s.type}/{s.id} version {s.version}: {result.status}"}]}
        return fhir_response(outcome, result.status, result.headers, media)
    return fhir_response(result.stored.resource, result.status, result.headers, media)


async def _json_body(request: Request) -> Any:
    require_json(request)
    return parse_json(await read_body(request, request.app.state.settings.max_body_bytes))


@router.get("/metadata")
async def metadata(request: Request) -> Response:
    return fhir_response(request.app.state.capability, media_type=response_type(request))


@router.post("")
async def bundle(request: Request) -> Response:
    media = response_type(request)
    principal = await _principal(request, None, "read")
    body = await _json_body(request)
    ix = _ix(request)

    async def run_get(segments: list[str], pairs: list[tuple[str, str]]) -> dict[str, Any]:
        return await _get(ix, segments, pairs, strict=_strict(request))

    processor = BundleProcessor(ix, principal, run_get)
    return fhir_response(await processor.process(body), 200, media_type=media)


async def _get(ix: Interactions, segments: list[str], pairs: list[tuple[str, str]], *, strict: bool) -> dict[str, Any]:
    """A GET inside a Bundle: read, vread, search or history."""
    n = len(segments)
    if n == 1:
        return await ix.search(segments[0], pairs, strict=strict)
    if n == 2 and segments[1] == "_history":
        return await ix.history(segments[0], None, pairs)
    if n == 2:
        return (await ix.read(segments[0], segments[1])).resource or {}
    if n == 3 and segments[2] == "_history":
        return await ix.history(segments[0], segments[1], pairs)
    if n == 4 and segments[2] == "_history":
        return (await ix.vread(segments[0], segments[1], segments[3])).resource or {}
    raise NotFound(f"no FHIR interaction at {'/'.join(segments)}")


@router.get("/{type_}")
async def search(request: Request, type_: str) -> Response:
    media = response_type(request)
    await _principal(request, check_type(type_), "read")
    bundle = await _ix(request).search(type_, list(request.query_params.multi_items()), strict=_strict(request))
    return fhir_response(bundle, media_type=media)


@router.post("/{type_}/_search")
async def search_post(request: Request, type_: str) -> Response:
    media = response_type(request)
    await _principal(request, check_type(type_), "read")
    ctype = (request.headers.get("content-type") or "application/x-www-form-urlencoded").split(";")[0].strip()
    if ctype != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType(f"POST _search takes application/x-www-form-urlencoded, got {ctype!r}")
    raw = await read_body(request, request.app.state.settings.max_body_bytes)
    try:
        form = parse_qsl(raw.decode(), keep_blank_values=True, strict_parsing=bool(raw.strip()))
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRequest(f"the _search form body is malformed: {exc}") from exc
    pairs = list(request.query_params.multi_items()) + form
    return fhir_response(await _ix(request).search(type_, pairs, strict=_strict(request)), media_type=media)


@router.get("/{type_}/_history")
async def history_type(request: Request, type_: str) -> Response:
    media = response_type(request)
    await _principal(request, check_type(type_), "read")
    bundle = await _ix(request).history(type_, None, list(request.query_params.multi_items()))
    return fhir_response(bundle, media_type=media)


@router.post("/{type_}")
async def create(request: Request, type_: str) -> Response:
    media = response_type(request)
    await _principal(request, check_type(type_), "write")
    body = await _json_body(request)
    ix = _ix(request)
    write = await ix.plan_create(type_, body, if_none_exist=request.headers.get("if-none-exist"))
    return _render_write(request, await ix.commit_one(write), media)


@router.get("/{type_}/{id_}")
async def read(request: Request, type_: str, id_: str) -> Response:
    media = response_type(request)
    await _principal(request, check_type(type_), "read")
    ix = _ix(request)
    stored = await ix.read(type_, id_)
    headers = ix.headers_for(stored)
    if await ix.conditional_read_check(stored, request.headers.get("if-none-match")):
        return Response(status_code=304, headers=headers)
    return fhir_response(stored.resource, 200, headers, media)


@router.put("/{type_}/{id_}")
async def update(request: Request, type_: str, id_: str) -> Response:
    media = response_type(request)
    await _principal(request, check_type(type_), "write")
    body = await _json_body(request)
    ix = _ix(request)
    write = await ix.plan_update(type_, id_, body, if_match=request.headers.get("if-match"))
    return _render_write(request, await ix.commit_one(write), media)


@router.delete("/{type_}/{id_}")
async def delete(request: Request, type_: str, id_: str) -> Response:
    response_type(request)
    await _principal(request, check_type(type_), "write")
    ix = _ix(request)
    result = await ix.commit_one(ix.plan_delete(type_, id_, if_match=request.headers.get("if-match")))
    return fhir_response(None, 204, result.headers)


@router.get("/{type_}/{id_}/_history")
async def history_instance(request: Request, type_: str, id_: str) -> Response:
    media = response_type(request)
    await _principal(request, check_type(type_), "read")
    bundle = await _ix(request).history(type_, id_, list(request.query_params.multi_items()))
    return fhir_response(bundle, media_type=media)


@router.get("/{type_}/{id_}/$why")
async def why(request: Request, type_: str, id_: str) -> Response:
    """``GET /fhir/RequestGroup/{run}/$why``: why a journey run took its path, as a ``Parameters`` resource
    (each executed step with its condition values, evidence and outputs, and the transcript)."""
    media = response_type(request)
    if type_ != "RequestGroup":
        raise NotSupported(f"$why is an operation on RequestGroup (a journey run), not on {type_}")
    await _principal(request, "RequestGroup", "read")
    from ..journeys.explain import as_parameters
    from ..journeys.explain import why as explain

    return fhir_response(as_parameters(await explain(request.app.state.store, id_)), 200, None, media)


@router.post("/{type_}/{id_}/$mark-read")
async def mark_read(request: Request, type_: str, id_: str) -> Response:
    """``POST /fhir/Communication/{id}/$mark-read``: the patient portal marks a message read (``received``
    set, status ``completed``, engagement ``read``), which waiting journeys see. Repeating it changes nothing."""
    media = response_type(request)
    if type_ != "Communication":
        raise NotSupported(f"$mark-read is an operation on Communication, not on {type_}")
    await _principal(request, "Communication", "write")
    import time

    from ..channels import engagement

    store = request.app.state.store
    stored = await store.read("Communication", id_)
    if stored is None or stored.deleted:
        raise NotFound(f"Communication/{id_} is not known")
    await engagement.record(store, id_, "read", at=time.time(), base_url=request.app.state.settings.fhir_base)
    request.app.state.journeys.wake()
    latest = await store.read("Communication", id_)
    return fhir_response(latest.resource, 200, _ix(request).headers_for(latest), media)


@router.get("/{type_}/{id_}/_history/{vid}")
async def vread(request: Request, type_: str, id_: str, vid: str) -> Response:
    media = response_type(request)
    await _principal(request, check_type(type_), "read")
    ix = _ix(request)
    stored = await ix.vread(type_, id_, vid)
    return fhir_response(stored.resource, 200, ix.headers_for(stored), media)


__all__ = ["FHIR_JSON", "router"]

"""HTTP framing shared by every route: content negotiation, body limits, Prefer, and FHIR JSON responses."""

from __future__ import annotations

import re
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from ..errors import NotAcceptable, PayloadTooLarge, UnsupportedMediaType

FHIR_JSON = "application/fhir+json"
_JSON_TYPES = ("application/fhir+json", "application/json", "application/json+fhir", "text/json")
_FORMAT_JSON = {"json", "application/json", "application/fhir+json", "application/json+fhir", "text/json"}


def response_type(request: Request) -> str:
    """The JSON media type to answer with, or NotAcceptable for a format we cannot produce (XML, ...)."""
    fmt = request.query_params.get("_format")
    if fmt is not None:
        fmt = fmt.split(";")[0].strip().lower()
        if fmt not in _FORMAT_JSON:
            raise NotAcceptable(f"_format={fmt} is not supported; this server speaks FHIR JSON only",
                                expression=["_format"])
        return "application/json" if fmt == "application/json" else FHIR_JSON
    accept = request.headers.get("accept", "")
    if not accept:
        return FHIR_JSON
    types = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    if any(t in ("*/*", "application/*", FHIR_JSON, "application/json+fhir") for t in types):
        return FHIR_JSON
    if "application/json" in types or "text/json" in types:
        return "application/json"
    raise NotAcceptable(f"cannot produce any of Accept: {accept}; this server speaks FHIR JSON "
                        "(application/fhir+json)")


def fhir_response(body: dict[str, Any] | None, status: int = 200, headers: dict[str, str] | None = None,
                  media_type: str = FHIR_JSON) -> Response:
    content = orjson.dumps(body) if body is not None else b""
    return Response(content, status_code=status, headers=headers,
                    media_type=f"{media_type}; charset=utf-8" if body is not None else None)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing anything over ``limit`` bytes (413) without buffering it all."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"request body of {length} bytes exceeds the limit of {limit} bytes "
                              "(FHIR_OUTREACH_MAX_BODY_BYTES)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes (FHIR_OUTREACH_MAX_BODY_BYTES)")
        chunks.append(chunk)
    return b"".join(chunks)


def require_json(request: Request) -> None:
    ctype = request.headers.get("content-type")
    if ctype is None:
        return  # lenient: a body without Content-Type is parsed as JSON
    if ctype.split(";")[0].strip().lower() not in _JSON_TYPES:
        raise UnsupportedMediaType(f"Content-Type {ctype!r} is not supported; send application/fhir+json")


def prefer(request: Request) -> dict[str, str]:
    """The ``Prefer`` preferences as a dict. RFC 7240 separates preferences with commas (``return=minimal,
    handling=strict``); semicolons are accepted too, as the FHIR preferences take no parameters."""
    out: dict[str, str] = {}
    for header in request.headers.getlist("prefer"):
        for part in re.split(r"[,;]", header):
            part = part.strip()
            if "=" in part:
                key, _, value = part.partition("=")
                out[key.strip().lower()] = value.strip().strip('"')
    return out

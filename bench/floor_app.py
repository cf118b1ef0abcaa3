"""The floor for the intake benchmark: a bare FastAPI endpoint that only parses JSON and answers 200.

Run by ``bench_intake.py`` with the same uvicorn settings as ``fhir-outreach serve``; the ratio of our hook
throughput to this one says how much the durable inbox costs.
"""

from __future__ import annotations

import orjson
from fastapi import FastAPI, Request
from starlette.responses import Response

app = FastAPI()


@app.post("/hooks/{key}")
async def hook(request: Request, key: str) -> Response:
    orjson.loads(await request.body())
    return Response(b'{"ok":true}', media_type="application/json")


@app.get("/healthz")
async def healthz() -> Response:
    return Response(b"{}", media_type="application/json")

"""Journey files: the YAML authoring form, or FHIR JSON (a PlanDefinition, or a Bundle holding the
PlanDefinition and its ActivityDefinitions), read into resources and written back out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import yaml  # type: ignore[import-untyped]

from ..errors import InvalidJourney
from .compiler import compile_journey, decompile


def parse_text(text: str | bytes, *, name: str = "journey") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(PlanDefinition, [ActivityDefinition]) from YAML or FHIR JSON text."""
    raw = text.decode() if isinstance(text, bytes) else text
    if raw.lstrip().startswith("{"):
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidJourney([(name, f"invalid JSON: {exc}")]) from exc
        return from_resources(doc, name)
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise InvalidJourney([(name, f"invalid YAML: {exc}")]) from exc
    return compile_journey(doc)


def from_resources(doc: Any, name: str = "journey") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
        resources = [e.get("resource") for e in doc.get("entry") or [] if isinstance(e, dict)]
    else:
        resources = [doc]
    plans = [r for r in resources if isinstance(r, dict) and r.get("resourceType") == "PlanDefinition"]
    templates = [r for r in resources if isinstance(r, dict) and r.get("resourceType") == "ActivityDefinition"]
    if len(plans) != 1:
        raise InvalidJourney([(name, f"expected one PlanDefinition, found {len(plans)}")])
    return plans[0], templates


def read_file(path: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise InvalidJourney([(str(p), f"cannot read: {exc.strerror}")]) from exc
    return parse_text(text, name=str(p))


def bundle(plan: dict[str, Any], templates: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection",
            "entry": [{"fullUrl": f"{r.get('url')}", "resource": r} for r in [plan, *templates]]}


def dump(plan: dict[str, Any], templates: list[dict[str, Any]], fmt: str = "yaml") -> str:
    if fmt == "json":
        clean = [_clean(r) for r in [plan, *templates]]
        return orjson.dumps(bundle(clean[0], clean[1:]), option=orjson.OPT_INDENT_2).decode() + "\n"
    return str(yaml.safe_dump(decompile(plan, templates), sort_keys=False, allow_unicode=True, width=110))


def _clean(resource: dict[str, Any]) -> dict[str, Any]:
    out = dict(resource)
    meta = {k: v for k, v in (out.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    if meta:
        out["meta"] = meta
    else:
        out.pop("meta", None)
    return out

"""Parse and validate FHIR JSON: the edge where orjson and pydantic errors become ``InvalidRequest``.

Resources are validated with the ``fhir.resources.R4B`` models (R4 and R4B agree on every element we use).
The models check structure and datatypes; they do not enforce cardinality ``1..`` or required code
bindings, so ``_check_required`` walks the validated model using the metadata the models carry
(``element_required``, ``enum_values``) and completes the three R4 status value sets whose lists the
models truncate. Every problem is reported with its element path (``Task.identifier[0].system``).
"""

from __future__ import annotations

import functools
from typing import Any

import orjson
from fhir.resources.R4B import get_fhir_model_class
from pydantic import BaseModel, ValidationError

from ..errors import InvalidRequest, InvalidResource

# R4 required value sets that the generated models list only partially (they end in "+").
_COMPLETE_ENUMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("Task", "status"): ("draft", "requested", "received", "accepted", "rejected", "ready", "cancelled",
                         "in-progress", "on-hold", "failed", "completed", "entered-in-error"),
    ("Encounter", "status"): ("planned", "arrived", "triaged", "in-progress", "onleave", "finished",
                              "cancelled", "entered-in-error", "unknown"),
    ("Observation", "status"): ("registered", "preliminary", "final", "amended", "corrected", "cancelled",
                                "entered-in-error", "unknown"),
}
_MAX_ISSUES = 20


def parse_json(body: bytes, where: str = "request body") -> Any:
    if not body.strip():
        raise InvalidRequest(f"the {where} is empty; a FHIR JSON resource is required")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the {where} is not valid JSON: {exc}") from exc


def _path(root: str, loc: tuple[Any, ...]) -> str:
    out = root
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not part.startswith(("function-", "union[", "json-or-python")):
            out += f".{part}"
    return out


def _issue(path: str, message: str) -> dict[str, Any]:
    return {"severity": "error", "code": "structure", "diagnostics": f"{path}: {message}",
            "expression": [path]}


def validate_resource(data: Any, expected_type: str | None = None, *, root: str | None = None) -> dict[str, Any]:
    """Validate one resource dict; return it unchanged or raise ``InvalidResource`` listing every issue."""
    if not isinstance(data, dict):
        raise InvalidRequest(f"{root or 'the body'} must be a JSON object (a FHIR resource)")
    rtype = data.get("resourceType")
    if not isinstance(rtype, str):
        raise InvalidResource(f"{root or 'the resource'} has no resourceType", expression=[root or "resourceType"])
    if expected_type and rtype != expected_type:
        raise InvalidResource(f"resourceType is {rtype!r} but the URL is for {expected_type}",
                              expression=[f"{root}.resourceType" if root else "resourceType"])
    try:
        model_cls = get_fhir_model_class(rtype)
    except KeyError as exc:
        raise InvalidResource(f"unknown resourceType {rtype!r}", expression=["resourceType"]) from exc
    label = root or rtype
    try:
        model = model_cls.model_validate(data)
    except ValidationError as exc:
        issues = [_issue(_path(label, tuple(e["loc"])), e["msg"].removeprefix("Value error, "))
                  for e in exc.errors()[:_MAX_ISSUES]]
        _raise(issues)
    problems: list[dict[str, Any]] = []
    _check_required(model, label, problems)
    if problems:
        _raise(problems)
    return data


def _raise(issues: list[dict[str, Any]]) -> None:
    first = issues[0]
    more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
    raise InvalidResource(first["diagnostics"] + more, expression=first["expression"], issues=issues[1:])


@functools.cache
def _field_rules(model_cls: type[BaseModel]) -> tuple[tuple[str, str, bool, tuple[str, ...] | None], ...]:
    """Per model class, once: (attribute, JSON name, required, closed value set) for every element."""
    rtype = getattr(model_cls, "get_resource_type", lambda: "")()
    rules = []
    for name, info in model_cls.model_fields.items():
        if name.endswith("__ext"):
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        alias = info.alias or name
        enum = _COMPLETE_ENUMS.get((rtype, alias)) or extra.get("enum_values")
        closed = tuple(map(str, enum)) if isinstance(enum, list | tuple) and "+" not in enum else None
        rules.append((name, alias, bool(extra.get("element_required")), closed))
    return tuple(rules)


def _check_required(model: BaseModel, path: str, problems: list[dict[str, Any]]) -> None:
    for name, alias, required, closed in _field_rules(type(model)):
        if len(problems) >= _MAX_ISSUES:
            return
        value = getattr(model, name, None)
        if value is None:
            if required and getattr(model, name + "__ext", None) is None:
                problems.append(_issue(f"{path}.{alias}", "element is required (minimum cardinality 1)"))
            continue
        if closed is not None and isinstance(value, str) and value not in closed:
            problems.append(_issue(f"{path}.{alias}",
                                   f"{value!r} is not in the required value set ({' | '.join(closed)})"))
        elif isinstance(value, BaseModel):
            _check_required(value, f"{path}.{alias}", problems)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    _check_required(item, f"{path}.{alias}[{i}]", problems)

"""FHIR search: parse request parameters into a backend-neutral ``Query``.

``api.fhir`` hands the raw ``(name, value)`` pairs of a search here; this module knows the parameter
table (``searchparams``), prefixes and modifiers, and produces ``Clause``/``Pred`` values that each store
backend translates into its own query language against the entries ``paths.extract`` wrote. Bad values
raise ``InvalidRequest`` naming the parameter; unknown parameters are ignored (lenient, the default) or
rejected (``Prefer: handling=strict``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from ..errors import InvalidRequest, NotSupported
from .paths import date_range, normalize_string
from .searchparams import COMMON, RESOURCE_TYPES, SearchParam, params_for

Op = Literal["id", "token", "ref", "ref_id", "str_prefix", "str_contains", "str_exact", "uri", "date", "missing"]
DateCond = tuple[Literal["lo", "hi"], Literal[">", ">=", "<", "<="], float]


@dataclass(frozen=True, slots=True)
class Pred:
    """One alternative value of a clause (values separated by commas are OR-ed)."""

    op: Op
    sys: str | None = None  # token: system to match; "" = must have no system; None = any
    val: str | None = None
    date: tuple[DateCond, ...] = ()  # AND-ed conditions on the entry's lo/hi
    date_negate: bool = False  # ``ne``: none of the conditions hold together
    missing: bool = False


@dataclass(frozen=True, slots=True)
class Clause:
    """All entries of ``param`` tested against ``preds`` (OR); clauses of a query are AND-ed."""

    param: str
    preds: tuple[Pred, ...]
    negate: bool = False  # ``:not``: matches resources with no entry matching any pred


@dataclass(frozen=True, slots=True)
class Include:
    source_type: str
    param: str
    target_type: str | None


@dataclass
class Query:
    resource_type: str
    clauses: list[Clause] = field(default_factory=list)
    sort: list[tuple[str, bool]] = field(default_factory=list)  # (param, descending)
    offset: int = 0
    count: int = 50
    summary_count: bool = False
    include: list[Include] = field(default_factory=list)
    revinclude: list[Include] = field(default_factory=list)
    used: list[tuple[str, str]] = field(default_factory=list)  # parameters applied (for the self link)
    ignored: list[str] = field(default_factory=list)


PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb")
_SPLIT_COMMA = re.compile(r"(?<!\\),")
_SPLIT_PIPE = re.compile(r"(?<!\\)\|")


def _unescape(text: str) -> str:
    return text.replace("\\,", ",").replace("\\|", "|").replace("\\$", "$").replace("\\\\", "\\")


def date_conditions(prefix: str, lo: float, hi: float) -> tuple[tuple[DateCond, ...], bool]:
    """Conditions on a target range [t.lo, t.hi) for a search value [lo, hi) with a prefix (R4 §3.1.1.4.5)."""
    eq: tuple[DateCond, ...] = (("lo", ">=", lo), ("hi", "<=", hi))
    table: dict[str, tuple[tuple[DateCond, ...], bool]] = {
        "eq": (eq, False),
        "ne": (eq, True),
        "gt": ((("hi", ">", hi),), False),
        "lt": ((("lo", "<", lo),), False),
        "ge": ((("hi", ">", lo),), False),
        "le": ((("lo", "<", hi),), False),
        "sa": ((("lo", ">=", hi),), False),
        "eb": ((("hi", "<=", lo),), False),
    }
    return table[prefix]


def _date_pred(name: str, raw: str) -> Pred:
    prefix = "eq"
    if len(raw) > 2 and raw[:2].isalpha() and raw[2].isdigit():
        prefix, raw = raw[:2], raw[2:]
        if prefix not in PREFIXES:
            raise NotSupported(f"search parameter '{name}': prefix '{prefix}' is not supported "
                               f"(supported: {', '.join(PREFIXES)})", expression=[name])
    try:
        lo, hi = date_range(raw)
    except ValueError as exc:
        raise InvalidRequest(f"search parameter '{name}': {exc}", expression=[name]) from exc
    conds, negate = date_conditions(prefix, lo, hi)
    return Pred("date", date=conds, date_negate=negate)


def _token_pred(raw: str) -> Pred:
    parts = _SPLIT_PIPE.split(raw, maxsplit=1)
    if len(parts) == 1:
        return Pred("token", None, _unescape(raw))
    system, code = _unescape(parts[0]), _unescape(parts[1])
    return Pred("token", system, code or None)


def _reference_pred(param: SearchParam, modifier: str | None, raw: str, base_url: str | None) -> Pred:
    value = _unescape(raw)
    if base_url and value.startswith(base_url.rstrip("/") + "/"):
        value = value[len(base_url.rstrip("/")) + 1 :]
    if modifier:  # subject:Patient=123
        return Pred("ref", val=f"{modifier}/{value}")
    if "/" in value or ":" in value:
        return Pred("ref", val=value.split("/_history/")[0])
    if len(param.targets) == 1:
        return Pred("ref", val=f"{param.targets[0]}/{value}")
    return Pred("ref_id", sys=value)


def _preds_for(param: SearchParam, modifier: str | None, raw: str, base_url: str | None) -> list[Pred]:
    values = [v for v in _SPLIT_COMMA.split(raw)]
    if any(v == "" for v in values):
        raise InvalidRequest(f"search parameter '{param.name}' has an empty value", expression=[param.name])
    kind = param.kind
    if kind == "token":
        return [_token_pred(v) for v in values]
    if kind == "reference":
        return [_reference_pred(param, modifier, v, base_url) for v in values]
    if kind == "date":
        return [_date_pred(param.name, v) for v in values]
    if kind == "uri":
        return [Pred("uri", val=_unescape(v)) for v in values]
    op: Op = {"exact": "str_exact", "contains": "str_contains"}.get(modifier or "", "str_prefix")  # type: ignore[assignment]
    if op == "str_exact":
        return [Pred(op, sys=_unescape(v)) for v in values]
    return [Pred(op, val=normalize_string(_unescape(v))) for v in values]


_MODIFIERS = {
    "token": {"not", "missing"},
    "reference": {"missing"},  # plus a resource-type modifier
    "date": {"missing"},
    "string": {"exact", "contains", "missing"},
    "uri": {"missing"},
}


def _parse_int(name: str, raw: str, maximum: int | None = None) -> int:
    if not raw.isdigit():
        raise InvalidRequest(f"'{name}' must be a non-negative integer, got {raw!r}", expression=[name])
    value = int(raw)
    if maximum is not None and value > maximum:
        raise InvalidRequest(f"'{name}' must be at most {maximum}, got {value}", expression=[name])
    return value


def _parse_include(name: str, raw: str, resource_type: str, reverse: bool) -> Include:
    parts = raw.split(":")
    if len(parts) not in (2, 3) or parts[0] not in RESOURCE_TYPES:
        raise InvalidRequest(f"'{name}' must be Type:param[:TargetType], got {raw!r}", expression=[name])
    source, pname = parts[0], parts[1]
    target = parts[2] if len(parts) == 3 else None
    param = params_for(source).get(pname)
    if param is None or param.kind != "reference":
        raise InvalidRequest(f"'{name}': {source} has no reference search parameter '{pname}'", expression=[name])
    if not reverse and source != resource_type:
        raise InvalidRequest(f"'{name}': {raw!r} does not start with the searched type {resource_type}",
                             expression=[name])
    return Include(source, pname, target)


def parse_query(resource_type: str, pairs: Sequence[tuple[str, str]], *, strict: bool = False,
                base_url: str | None = None, default_count: int = 50, max_count: int = 1000) -> Query:
    query = Query(resource_type, count=default_count)
    table = params_for(resource_type)
    for key, raw in pairs:
        name, _, modifier = key.partition(":")
        if name == "_count":
            query.count = min(_parse_int(name, raw), max_count)
        elif name == "_offset":
            query.offset = _parse_int(name, raw)
        elif name == "_sort":
            query.sort = _parse_sort(raw, table)
        elif name == "_include":
            query.include.append(_parse_include(name, raw, resource_type, reverse=False))
        elif name == "_revinclude":
            query.revinclude.append(_parse_include(name, raw, resource_type, reverse=True))
        elif name == "_summary":
            if raw == "count":
                query.summary_count = True
            elif raw != "false":
                raise NotSupported(f"'_summary={raw}' is not supported (supported: count, false)",
                                   expression=["_summary"])
        elif name in ("_total", "_format"):
            pass  # totals are always accurate; _format is handled by content negotiation
        elif name in COMMON:
            query.clauses.append(_common_clause(name, modifier, raw))
        elif "." in name or (modifier and "." in modifier):
            raise NotSupported(f"chained search '{key}' is not supported", expression=[key])
        elif name in table:
            query.clauses.append(_clause(table[name], modifier or None, raw, base_url))
        else:
            if strict:
                raise InvalidRequest(f"unknown search parameter '{key}' for {resource_type}", expression=[key])
            query.ignored.append(key)
            continue
        if name not in ("_count", "_offset", "_format"):
            query.used.append((key, raw))
    return query


def _parse_sort(raw: str, table: dict[str, SearchParam]) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for item in raw.split(","):
        desc = item.startswith("-")
        name = item.lstrip("-")
        if name not in COMMON and name not in table:
            raise InvalidRequest(f"'_sort': unknown search parameter '{name}'", expression=["_sort"])
        out.append((name, desc))
    return out


def _common_clause(name: str, modifier: str, raw: str) -> Clause:
    if modifier:
        raise NotSupported(f"modifier ':{modifier}' is not supported on '{name}'", expression=[name])
    values = _SPLIT_COMMA.split(raw)
    if name == "_id":
        return Clause("_id", tuple(Pred("id", val=_unescape(v)) for v in values))
    return Clause("_lastUpdated", tuple(_date_pred(name, v) for v in values))


def _clause(param: SearchParam, modifier: str | None, raw: str, base_url: str | None) -> Clause:
    if modifier == "missing":
        if raw not in ("true", "false"):
            raise InvalidRequest(f"'{param.name}:missing' must be true or false", expression=[param.name])
        return Clause(param.name, (Pred("missing", missing=raw == "true"),))
    allowed = _MODIFIERS[param.kind]
    type_modifier = param.kind == "reference" and modifier in RESOURCE_TYPES
    if modifier and modifier not in allowed and not type_modifier:
        raise NotSupported(f"modifier ':{modifier}' is not supported on {param.kind} parameter '{param.name}'",
                           expression=[f"{param.name}:{modifier}"])
    if modifier == "not":
        return Clause(param.name, tuple(_preds_for(param, None, raw, base_url)), negate=True)
    return Clause(param.name, tuple(_preds_for(param, modifier, raw, base_url)))

"""Index extraction: the FHIRPath subset used by search-parameter expressions, evaluated at write time.

Search needs the values of ~10 elements of every resource written, and a general FHIRPath engine is far
too slow for that hot path (and ``fhirpathpy`` has no ``resolve()``). The expressions in
``searchparams`` use only dotted paths, choice elements, ``|`` unions and two ``where`` filters; this module
compiles each once into a small walker and turns the values it finds into typed ``IndexEntry`` rows that
both store backends keep beside the resource. Journey conditions use the full engine in ``fhirpath``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from functools import lru_cache
from typing import Any

from .searchparams import SearchParam, params_for

_WHERE_RESOLVE = re.compile(r"^(.*)\.where\(resolve\(\) is (\w+)\)$")
_WHERE_EQ = re.compile(r"^(.*)\.where\((\w+)\s*=\s*'([^']*)'\)$")


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One searchable value. ``sys``/``val`` carry token system/code, reference id/"Type/id", string
    raw/normalised and uri value; ``lo``/``hi`` carry date ranges (epoch seconds, hi exclusive)."""

    param: str
    sys: str | None = None
    val: str | None = None
    lo: float | None = None
    hi: float | None = None


# Open ends of a Period: finite so that both stores and JSON can hold them.
OPEN_LO = -1e15
OPEN_HI = 1e15

Walker = Callable[[dict[str, Any]], list[Any]]


def _children(node: Any, name: str) -> Iterator[Any]:
    if not isinstance(node, dict):
        return
    if name in node:
        value = node[name]
        yield from value if isinstance(value, list) else (value,)
        return
    # Choice element: value[x] is stored as valueQuantity, valueCodeableConcept, ...
    for key, value in node.items():
        if key.startswith(name) and len(key) > len(name) and key[len(name)].isupper():
            yield from value if isinstance(value, list) else (value,)


def _ref_type(ref: Any) -> str | None:
    if isinstance(ref, dict):
        if isinstance(ref.get("type"), str):
            return ref["type"]
        text = ref.get("reference")
        if isinstance(text, str):
            parts = text.split("/_history/")[0].rstrip("/").split("/")
            if len(parts) >= 2:
                return parts[-2]
    return None


@lru_cache(maxsize=1024)
def compile_path(expression: str) -> Walker:
    """Compile ``Type.a.b | Type.c.where(...)`` once into a function of a resource dict."""
    alternatives: list[Walker] = []
    for part in expression.split("|"):
        alternatives.append(_compile_single(part.strip()))

    def run(resource: dict[str, Any]) -> list[Any]:
        out: list[Any] = []
        for alt in alternatives:
            out.extend(alt(resource))
        return out

    return run


def _compile_single(expr: str) -> Walker:
    ref_filter: str | None = None
    eq_filter: tuple[str, str] | None = None
    if m := _WHERE_RESOLVE.match(expr):
        expr, ref_filter = m.group(1), m.group(2)
    elif m := _WHERE_EQ.match(expr):
        expr, eq_filter = m.group(1), (m.group(2), m.group(3))
    steps = expr.split(".")[1:]  # drop the type name
    if not steps or not all(re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", s) for s in steps):
        raise ValueError(f"unsupported index expression: {expr!r}")

    def walk(resource: dict[str, Any]) -> list[Any]:
        nodes: list[Any] = [resource]
        for step in steps:
            nodes = [child for node in nodes for child in _children(node, step)]
            if not nodes:
                return nodes
        if ref_filter is not None:
            nodes = [n for n in nodes if _ref_type(n) == ref_filter]
        if eq_filter is not None:
            key, want = eq_filter
            nodes = [n for n in nodes if isinstance(n, dict) and n.get(key) == want]
        return nodes

    return walk


# --- values ---------------------------------------------------------------------------------------

_DATE_RE = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


def date_range(text: str) -> tuple[float, float]:
    """The [lo, hi) range in epoch seconds that a FHIR date/dateTime/instant of any precision covers.

    Values without a zone are read as UTC. Raises ``ValueError`` with the reason for anything else."""
    m = _DATE_RE.match(text.strip())
    if not m:
        raise ValueError(f"not a FHIR date/dateTime: {text!r}")
    year, month, day, hour, minute, sec, frac, tz = m.groups()
    tzinfo = UTC
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        tzinfo = timezone(sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])))
    y = int(year)
    if month is None:
        lo = datetime(y, 1, 1, tzinfo=UTC)
        return lo.timestamp(), datetime(y + 1, 1, 1, tzinfo=UTC).timestamp()
    mo = int(month)
    if day is None:
        lo = datetime(y, mo, 1, tzinfo=UTC)
        hi = datetime(y + (mo == 12), mo % 12 + 1, 1, tzinfo=UTC)
        return lo.timestamp(), hi.timestamp()
    d = datetime(y, mo, int(day), tzinfo=tzinfo)
    if hour is None:
        return d.timestamp(), (d + timedelta(days=1)).timestamp()
    d = d.replace(hour=int(hour), minute=int(minute))
    if sec is None:
        return d.timestamp(), (d + timedelta(minutes=1)).timestamp()
    d = d.replace(second=int(sec))
    if frac:
        digits = len(frac) - 1
        start = d.timestamp() + float(frac)
        return start, start + 10.0**-digits
    return d.timestamp(), d.timestamp() + 1.0


def normalize_string(text: str) -> str:
    """Case- and accent-insensitive form used by the default and ``:contains`` string searches."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold().strip()


def split_reference(ref: str, base_url: str | None) -> tuple[str, str | None]:
    """(``Type/id`` or absolute URL, id) for a literal reference; local base URLs are stripped."""
    ref = ref.split("/_history/")[0].rstrip("/")
    if base_url and ref.startswith(base_url.rstrip("/") + "/"):
        ref = ref[len(base_url.rstrip("/")) + 1 :]
    parts = ref.split("/")
    rid = parts[-1] if len(parts) >= 2 else None
    return ref, rid


_NAME_PARTS = ("text", "family", "given", "prefix", "suffix")
_ADDRESS_PARTS = ("text", "line", "city", "district", "state", "postalCode", "country")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key in _NAME_PARTS + _ADDRESS_PARTS:
            part = value.get(key)
            if isinstance(part, str):
                yield part
            elif isinstance(part, list):
                yield from (p for p in part if isinstance(p, str))


def _tokens(value: Any) -> Iterator[tuple[str | None, str]]:
    if isinstance(value, bool):
        yield None, "true" if value else "false"
    elif isinstance(value, str):
        yield None, value
    elif isinstance(value, dict):
        if isinstance(value.get("coding"), list):
            for coding in value["coding"]:
                if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                    yield coding.get("system"), coding["code"]
        elif isinstance(value.get("code"), str):
            yield value.get("system"), value["code"]
        elif isinstance(value.get("value"), str):  # Identifier, ContactPoint
            yield value.get("system"), value["value"]


def entries_for(param: SearchParam, values: Iterable[Any], base_url: str | None) -> Iterator[IndexEntry]:
    name = param.name
    for value in values:
        if param.kind == "token":
            for system, code in _tokens(value):
                yield IndexEntry(name, system, code)
        elif param.kind == "reference":
            if isinstance(value, dict) and isinstance(value.get("reference"), str):
                ref, rid = split_reference(value["reference"], base_url)
                yield IndexEntry(name, rid, ref)
            elif isinstance(value, str):  # canonical
                yield IndexEntry(name, None, value)
                if "|" in value:
                    yield IndexEntry(name, None, value.split("|", 1)[0])
        elif param.kind == "date":
            rng = _date_value(value)
            if rng:
                yield IndexEntry(name, lo=rng[0], hi=rng[1])
        elif param.kind == "string":
            for text in _strings(value):
                yield IndexEntry(name, text, normalize_string(text))
        elif param.kind == "uri" and isinstance(value, str):
            yield IndexEntry(name, None, value)


def _date_value(value: Any) -> tuple[float, float] | None:
    try:
        if isinstance(value, str):
            return date_range(value)
        if isinstance(value, dict) and ("start" in value or "end" in value):
            lo = date_range(value["start"])[0] if isinstance(value.get("start"), str) else OPEN_LO
            hi = date_range(value["end"])[1] if isinstance(value.get("end"), str) else OPEN_HI
            return lo, hi
    except ValueError:
        return None
    return None


def extract(resource: dict[str, Any], base_url: str | None = None) -> list[IndexEntry]:
    """Every index entry of a resource, for all search parameters of its type."""
    out: list[IndexEntry] = []
    for param in params_for(resource.get("resourceType", "")).values():
        walker = compile_path(param.expression)
        out.extend(entries_for(param, walker(resource), base_url))
    return out

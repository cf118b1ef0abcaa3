"""Message texts: Liquid templates with FHIRPath-backed variables, one variant per language.

A message template may carry its body as Liquid text per language (``message-text`` extensions) with
variables computed by FHIRPath (``dynamicValue`` paths ``var.<name>``). The variant is chosen from the
patient's ``communication`` languages (the preferred one first; an exact tag, then its primary language,
then the template's first variant). Undefined variables are errors (the step takes its error path), except
under Liquid's ``default`` filter. ``lint`` warns when an SMS or email text is fed clinical data: by default
messages point to the portal instead of carrying clinical content (PHI minimisation).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from liquid import Environment, StrictDefaultUndefined
from liquid.template import BoundTemplate

_ENV = Environment(undefined=StrictDefaultUndefined)
CLINICAL = re.compile(r"%(current|previous|event)\b|\b(Condition|Observation|Procedure|MedicationRequest|"
                      r"AllergyIntolerance|DiagnosticReport|diagnosis|reasonCode|valueQuantity|code\.coding)\b")


@lru_cache(maxsize=1024)
def parse_liquid(text: str) -> BoundTemplate:
    return _ENV.from_string(text)


def languages_of(patient: Mapping[str, Any] | None) -> list[str]:
    """The patient's languages, preferred first."""
    ranked: list[tuple[int, str]] = []
    for i, c in enumerate((patient or {}).get("communication") or []):
        for coding in (c.get("language") or {}).get("coding") or []:
            if coding.get("code"):
                ranked.append((0 if c.get("preferred") else 1 + i, str(coding["code"])))
    return [code for _, code in sorted(ranked)]


def choose(texts: Sequence[tuple[str, str]], languages: Sequence[str]) -> tuple[str, str]:
    by_lang = {lang.lower(): (lang, text) for lang, text in texts}
    for wanted in languages:
        hit = by_lang.get(wanted.lower()) or by_lang.get(wanted.split("-")[0].lower())
        if hit:
            return hit
        primary = wanted.split("-")[0].lower()
        for lang, text in texts:
            if lang.split("-")[0].lower() == primary:
                return lang, text
    return texts[0]


def render(text: str, variables: Mapping[str, Any]) -> str:
    return str(parse_liquid(text).render(**variables))


def lint(medium: str | None, expressions: Sequence[str], input_names: Sequence[str]) -> list[str]:
    """Warnings for an SMS or email text whose variables or payload read clinical data."""
    if medium not in ("sms", "email", None):
        return []
    inputs = re.compile(r"%(" + "|".join(map(re.escape, input_names)) + r")\b") if input_names else None
    out = []
    for expr in expressions:
        if CLINICAL.search(expr) or (inputs and inputs.search(expr)):
            out.append(f"{medium or 'a non-portal'} message uses clinical data ({expr!r}); point to the portal "
                       "instead (PHI minimisation)")
    return out

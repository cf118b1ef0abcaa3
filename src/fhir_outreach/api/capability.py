"""The CapabilityStatement served at ``GET /fhir/metadata``, generated from the search-parameter table so
that every type, interaction and parameter it lists is one the server really supports."""

from __future__ import annotations

from typing import Any

from .. import FHIR_VERSION, __version__
from ..fhir.searchparams import PARAMS

INTERACTIONS = ("read", "vread", "update", "delete", "history-instance", "history-type", "create", "search-type")
COMMON_PARAMS = (
    {"name": "_id", "type": "token", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id"},
    {"name": "_lastUpdated", "type": "date",
     "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated"},
)


def capability_statement(base_url: str, *, auth_on: bool, jwt: bool, started: str) -> dict[str, Any]:
    resources = []
    for rtype, params in PARAMS.items():
        refs = sorted(f"{rtype}:{p.name}" for p in params.values() if p.kind == "reference")
        # _revinclude=Source:param works for every reference parameter of any type that can point here.
        revrefs = sorted(f"{src}:{p.name}" for src, sp in PARAMS.items() for p in sp.values()
                         if p.kind == "reference" and (rtype in p.targets or not p.targets))
        resources.append({
            "type": rtype,
            "profile": f"http://hl7.org/fhir/StructureDefinition/{rtype}",
            "interaction": [{"code": code} for code in INTERACTIONS],
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": True,
            "conditionalCreate": True,
            "conditionalRead": "not-match",
            "conditionalUpdate": False,
            "conditionalDelete": "not-supported",
            "searchInclude": refs,
            "searchRevInclude": revrefs,
            "searchParam": [*COMMON_PARAMS, *(
                {"name": p.name, "type": p.kind, "documentation": p.expression} for p in params.values())],
        })
    security: dict[str, Any] = {"cors": False, "description": (
        "Bearer tokens: static tokens from FHIR_OUTREACH_API_TOKENS (or the generated data/api-token)"
        + (" and SMART Backend Services JWTs (system/<Type>.read|write scopes)" if jwt else ""))}
    if auth_on:
        security["service"] = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                            "code": "SMART-on-FHIR" if jwt else "OAuth"}]}]
    else:
        security["description"] = "Authentication is OFF on this server (FHIR_OUTREACH_AUTH=off)."
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": started,
        "kind": "instance",
        "software": {"name": "fhir-outreach", "version": __version__},
        "implementation": {"description": "fhir-outreach FHIR API", "url": base_url},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "application/json"],
        "rest": [{
            "mode": "server",
            "security": security,
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
            "searchParam": list(COMMON_PARAMS),
        }],
    }

"""The one error tree of fhir-outreach.

Every failure that can reach a client is one of these classes; each knows its FHIR issue type, its HTTP
status and whether a caller may retry. ``api.app`` turns any of them into an ``OperationOutcome``; routes
never build error responses by hand. Foreign errors (sqlite3, PyMongo, pydantic) are translated at their
edge (``store.*``, ``fhir.validation``) with ``raise ... from exc``.

    FhirError
    ├── InvalidRequest        400 invalid      (bad JSON, bad parameter, bad Bundle)
    │   └── InvalidResource   400 structure    (fails the R4 model; carries element paths)
    ├── Unauthorized          401 login
    ├── Forbidden             403 forbidden
    ├── NotFound              404 not-found
    ├── MethodNotAllowed      405 not-supported
    ├── NotAcceptable         406 not-supported (a format we cannot produce)
    ├── Conflict              409 conflict     (id clash, concurrent write)
    ├── Gone                  410 deleted
    ├── PreconditionFailed    412 conflict     (If-Match on a stale version; ambiguous condition)
    ├── PayloadTooLarge       413 too-costly
    ├── UnsupportedMediaType  415 not-supported
    ├── BusinessRule          422 business-rule
    ├── NotSupported          400 not-supported (a valid FHIR feature we do not implement)
    ├── StoreUnavailable      503 transient    (retryable)
    └── SettingsError         (start-up only: one line naming the setting)
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import Any


class FhirError(Exception):
    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR
    code: str = "exception"
    severity: str = "error"
    retryable: bool = False

    def __init__(self, diagnostics: str, *, expression: Sequence[str] | None = None,
                 issues: Sequence[dict[str, Any]] | None = None) -> None:
        super().__init__(diagnostics)
        self.diagnostics = diagnostics
        self.expression = list(expression or [])
        self.extra_issues = list(issues or [])

    def to_outcome(self) -> dict[str, Any]:
        issue: dict[str, Any] = {"severity": self.severity, "code": self.code, "diagnostics": self.diagnostics}
        if self.expression:
            issue["expression"] = self.expression
        return {"resourceType": "OperationOutcome", "issue": [issue, *self.extra_issues]}


class InvalidRequest(FhirError):
    status = HTTPStatus.BAD_REQUEST
    code = "invalid"


class InvalidResource(InvalidRequest):
    code = "structure"


class Unauthorized(FhirError):
    status = HTTPStatus.UNAUTHORIZED
    code = "login"


class Forbidden(FhirError):
    status = HTTPStatus.FORBIDDEN
    code = "forbidden"


class NotFound(FhirError):
    status = HTTPStatus.NOT_FOUND
    code = "not-found"


class MethodNotAllowed(FhirError):
    status = HTTPStatus.METHOD_NOT_ALLOWED
    code = "not-supported"


class NotAcceptable(FhirError):
    status = HTTPStatus.NOT_ACCEPTABLE
    code = "not-supported"


class Conflict(FhirError):
    status = HTTPStatus.CONFLICT
    code = "conflict"


class CommitInProgress(Conflict):
    """Another commit that touches this resource has not finished yet (MongoDB multi-write commits): not
    "it exists", but "try again shortly"."""

    retryable = True


class Gone(FhirError):
    status = HTTPStatus.GONE
    code = "deleted"


class PreconditionFailed(FhirError):
    status = HTTPStatus.PRECONDITION_FAILED
    code = "conflict"


class PayloadTooLarge(FhirError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    code = "too-costly"


class UnsupportedMediaType(FhirError):
    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    code = "not-supported"


class BusinessRule(FhirError):
    status = HTTPStatus.UNPROCESSABLE_ENTITY
    code = "business-rule"


class NotSupported(FhirError):
    status = HTTPStatus.BAD_REQUEST
    code = "not-supported"


class StoreUnavailable(FhirError):
    status = HTTPStatus.SERVICE_UNAVAILABLE
    code = "transient"
    retryable = True


class SettingsError(Exception):
    """A bad setting found at start-up; ``str()`` is the one line printed before exiting."""


class InvalidJourney(BusinessRule):
    """A journey (OutreachJourney PlanDefinition or its templates) that cannot run: each problem is one
    issue naming the step and the reason."""

    code = "invariant"

    def __init__(self, problems: Sequence[tuple[str, str]], *, label: str = "journey") -> None:
        issues = [{"severity": "error", "code": "invariant", "diagnostics": f"{where}: {why}",
                   "expression": [where]} for where, why in problems]
        first = issues[0]["diagnostics"] if issues else "invalid"
        more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
        super().__init__(f"{label} is invalid: {first}{more}", issues=issues[1:])
        self.expression = [problems[0][0]] if problems else []
        self.problems = list(problems)

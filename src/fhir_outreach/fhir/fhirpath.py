"""FHIRPath: the one module that imports ``fhirpathpy``.

Expressions are checked for syntax (fhirpathpy's own parser recovers silently from syntax errors, so the
grammar it ships is run here with a listener that raises), compiled once with the R4 model and cached.
Evaluation always works on JSON-mode dicts; variables such as ``%current``, ``%previous`` and
``%patient`` are passed by name. Any failure becomes ``FhirPathError`` naming the expression, so a
caller (a journey condition, a topic's criteria) can record it and take its error path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any

from antlr4 import CommonTokenStream, InputStream, Token
from antlr4.error.ErrorListener import ErrorListener
from fhirpathpy import compile as _fp_compile
from fhirpathpy.models import models
from fhirpathpy.parser.generated.FHIRPathLexer import FHIRPathLexer
from fhirpathpy.parser.generated.FHIRPathParser import FHIRPathParser

from ..errors import InvalidRequest

_R4 = models["r4"]


class FhirPathError(InvalidRequest):
    """An expression that does not parse, or failed while evaluating."""

    def __init__(self, expression: str, reason: str) -> None:
        super().__init__(f"FHIRPath {expression!r}: {reason}", expression=[expression])
        self.reason = reason


class _Raise(ErrorListener):  # type: ignore[misc]
    def syntaxError(self, recognizer: Any, offending: Any, line: int, column: int, msg: str, e: Any) -> None:  # noqa: N802
        raise ValueError(f"syntax error at column {column + 1}: {msg}")


def check_syntax(expression: str) -> None:
    """Raise FhirPathError unless ``expression`` is a complete FHIRPath expression."""
    if not expression.strip():
        raise FhirPathError(expression, "empty expression")
    try:
        lexer = FHIRPathLexer(InputStream(expression))
        lexer.removeErrorListeners()
        lexer.addErrorListener(_Raise())
        tokens = CommonTokenStream(lexer)
        parser = FHIRPathParser(tokens)
        parser.removeErrorListeners()
        parser.addErrorListener(_Raise())
        parser.expression()
        if tokens.LA(1) != Token.EOF:
            raise ValueError(f"unexpected {tokens.LT(1).text!r} at column {tokens.LT(1).column + 1}")
    except ValueError as exc:
        raise FhirPathError(expression, str(exc)) from exc


Compiled = Callable[[Any, Mapping[str, Any] | None], list[Any]]


@lru_cache(maxsize=4096)
def compile_expression(expression: str) -> Compiled:
    """Check and compile once; the result evaluates ``(resource, variables) -> list``."""
    check_syntax(expression)
    try:
        fn = _fp_compile(expression, _R4)
    except Exception as exc:
        raise FhirPathError(expression, str(exc)) from exc

    def run(resource: Any, variables: Mapping[str, Any] | None = None) -> list[Any]:
        try:
            return list(fn(resource if resource is not None else {}, dict(variables or {})))
        except Exception as exc:  # fhirpathpy raises bare Exceptions for unknown functions, arity...
            raise FhirPathError(expression, str(exc) or type(exc).__name__) from exc

    return run


def evaluate(expression: str, resource: Any, variables: Mapping[str, Any] | None = None) -> list[Any]:
    return compile_expression(expression)(resource, variables)


def evaluate_boolean(expression: str, resource: Any, variables: Mapping[str, Any] | None = None) -> bool | None:
    """FHIRPath's singleton boolean: ``[True]`` → True, ``[False]`` → False, empty → None (unknown)."""
    result = evaluate(expression, resource, variables)
    if not result:
        return None
    if len(result) == 1 and isinstance(result[0], bool):
        return result[0]
    raise FhirPathError(expression, f"expected a single boolean, got {result[:3]!r}")

"""Errors of the HTTP API as RFC 9457 problem details (``application/problem+json``).

Every error the API returns has the same body: ``type``, ``title``, ``status``, ``detail``, and
for bad input ``errors`` (one ``{"field", "message"}`` per problem, the field as a dotted path
such as ``items.3.item_code``). A handler raises :class:`Problem`; FastAPI's own errors
(validation, unknown route, wrong method) are turned into the same shape here.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from http import HTTPStatus
from typing import Any, Final

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from bus.logs import mask_text

log = structlog.get_logger(__name__)

PROBLEM_JSON: Final = "application/problem+json"
TYPE_BASE: Final = "https://xsettle.invalid/problems/"
"""Problem types are named under this base (documented in the README; not fetched)."""


class FieldProblem(BaseModel):
    """One bad field of a request."""

    field: str
    message: str


class ProblemBody(BaseModel):
    """An RFC 9457 problem (the body of every error response)."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldProblem] | None = None
    code: str | None = None
    """The contract's error code, where one applies (``NOT_FILED``…)."""


class Problem(Exception):
    """An error response: status, a short slug for ``type``, one line of detail."""

    def __init__(
        self,
        status: int,
        slug: str,
        detail: str,
        *,
        errors: Sequence[FieldProblem] = (),
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.slug = slug
        self.detail = detail
        self.errors = list(errors)
        self.code = code
        self.headers = headers

    def body(self) -> ProblemBody:
        return ProblemBody(
            type=TYPE_BASE + self.slug,
            title=HTTPStatus(self.status).phrase,
            status=self.status,
            detail=self.detail,
            errors=self.errors or None,
            code=self.code,
        )

    def response(self) -> JSONResponse:
        return JSONResponse(
            self.body().model_dump(exclude_none=True),
            status_code=self.status,
            media_type=PROBLEM_JSON,
            headers=self.headers,
        )


def not_found(what: str) -> Problem:
    """404 for an unknown claim, person, filing, review."""
    return Problem(404, "not-found", what)


def bad_field(field: str, message: str) -> Problem:
    """422 naming one field."""
    return Problem(
        422,
        "invalid-request",
        f"{field}: {message}",
        errors=[FieldProblem(field=field, message=message)],
    )


def _field(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] or parts
    return ".".join(parts) or "body"


def validation_problem(exc: RequestValidationError) -> Problem:
    """422 with every bad field; input values are never echoed (they may be ID numbers)."""
    errors = [
        FieldProblem(field=_field(e.get("loc", ())), message=str(e.get("msg", "invalid")))
        for e in exc.errors()
    ]
    first = errors[0] if errors else FieldProblem(field="body", message="invalid")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return Problem(422, "invalid-request", f"{first.field}: {first.message}{more}", errors=errors)


def install(app: FastAPI) -> None:
    """Make every error of ``app`` a problem response."""

    async def on_problem(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return exc.response()

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_problem(exc).response()

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        slug = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, "http-error")
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        headers = dict(exc.headers) if exc.headers else None
        return Problem(exc.status_code, slug, detail, headers=headers).response()

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        log.error(
            "http_internal_error",
            path=mask_text(request.url.path),
            error=mask_text(repr(exc))[:300],
            exc_info=exc,
        )
        return Problem(
            500, "internal-error", "internal error (logged with its traceback)"
        ).response()

    document_problems(app)
    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_error)


def document_problems(app: FastAPI) -> None:
    """Make the OpenAPI document say what the API sends: every 4xx response of a route is
    ``application/problem+json`` (FastAPI documents the models under ``application/json``)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.setdefault(
            "ProblemBody",
            ProblemBody.model_json_schema(ref_template="#/components/schemas/{model}"),
        )
        components.setdefault("FieldProblem", FieldProblem.model_json_schema())
        components["ProblemBody"].pop("$defs", None)
        ref = {"schema": {"$ref": "#/components/schemas/ProblemBody"}}
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.setdefault("responses", {})
                implied = []
                if "requestBody" in operation:
                    implied += ["400", "422"]  # an unreadable or invalid body
                if operation.get("security"):
                    implied.append("401")  # a token no role has, even on public routes
                for status in implied:
                    responses.setdefault(
                        status,
                        {
                            "description": HTTPStatus(int(status)).phrase,
                            "content": {"application/json": dict(ref)},
                        },
                    )
                for status, response in responses.items():
                    content = response.get("content", {})
                    if str(status).startswith("4") and "application/json" in content:
                        content[PROBLEM_JSON] = content.pop("application/json")
        for name, component in components.items():
            symbols = component.get("enum")
            if name not in UNKNOWN_IS_A_VALUE and isinstance(symbols, list):
                component["enum"] = [s for s in symbols if s != "UNKNOWN"]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


UNKNOWN_IS_A_VALUE: Final = frozenset({"ErrorCode", "AckState"})
"""Wire enums whose UNKNOWN the API may show (an error code or a state added later). The
other enums' UNKNOWN is only what a reader maps an unknown symbol to (contract v1.3): the API
neither takes nor gives it, and the OpenAPI document does not list it."""


class In(BaseModel):
    """Base of every request body: unknown fields refused, and no enum field may say
    UNKNOWN (the reader's stand-in for a symbol it does not know, never a value to send)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="after")
    @classmethod
    def _known(cls, value: object) -> object:
        if isinstance(value, StrEnum) and value.value == "UNKNOWN":
            raise ValueError("UNKNOWN is not a value to send: give one of the others")
        return value


PROBLEM_RESPONSES: Final[dict[int | str, dict[str, Any]]] = {
    code: {"model": ProblemBody, "description": HTTPStatus(code).phrase}
    for code in (400, 401, 403, 404, 409, 422)
}
"""OpenAPI ``responses=`` for routes: every error is a :class:`ProblemBody`."""

"""The server's OpenAPI description (`/openapi.json`), accurate for every route: the routes
parse their bodies themselves (strictly, with the server's limits), so the request and
response schemas are declared here rather than inferred from the route signatures."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from peregrine.server.protocol import ErrorResponse

_REF = "#/components/schemas/{model}"

# Every status a route can answer with besides 200, and when.
ERRORS = {
    HTTPStatus.BAD_REQUEST: "the request is malformed or outside a limit; `param` names "
                            "the field",
    HTTPStatus.UNAUTHORIZED: "--api-key is set and the request lacks it",
    HTTPStatus.NOT_FOUND: "the `model` is not served here, or no stored response has the "
                          "id given",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "the body is larger than --max-request-bytes",
    HTTPStatus.TOO_MANY_REQUESTS: "--max-queue-len requests already wait (Retry-After)",
    HTTPStatus.INTERNAL_SERVER_ERROR: "the engine failed on this request",
    HTTPStatus.SERVICE_UNAVAILABLE: "the model is loading, failed to load, or the server "
                                    "is stopping (Retry-After)",
}
BODY_ERRORS = tuple(ERRORS)
NO_BODY_ERRORS = (HTTPStatus.UNAUTHORIZED, HTTPStatus.SERVICE_UNAVAILABLE)
# Routes that read a stored response by its id.
STORED_ERRORS = (HTTPStatus.UNAUTHORIZED, HTTPStatus.NOT_FOUND)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route whose JSON body is `model`."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": _ref(model)}}}}


def responses(ok: type[BaseModel] | None, errors: tuple[HTTPStatus, ...] = BODY_ERRORS,
              stream: bool = False, media_type: str = "application/json",
              error: type[BaseModel] = ErrorResponse) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses`: 200 with `ok` (or `media_type` text), and each error status
    in `error`'s shape (OpenAI's by default); `stream` adds the SSE form of 200."""
    content: dict[str, Any] = {media_type: {"schema": _ref(ok) if ok else {"type": "string"}}}
    if stream:
        content["text/event-stream"] = {"schema": {"type": "string"}}
    out: dict[int | str, dict[str, Any]] = {200: {"description": "OK", "content": content}}
    for status in errors:
        out[int(status)] = {"description": ERRORS[status],
                            "content": {"application/json": {"schema": _ref(error)}}}
    return out


def install(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Make app.openapi() carry `models` (and what they refer to) as components."""
    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                                 routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                spec = model.model_json_schema(ref_template=_REF)
                components.update(spec.pop("$defs", {}))
                components[model.__name__] = spec
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]

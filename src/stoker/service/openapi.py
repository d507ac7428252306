"""The OpenAPI document of ``stoker serve``'s REST API, and what the app derives from it.

FastAPI writes the document from the routes; :func:`document` completes it
(the bodies the routes parse or stream themselves, our error body for 422)
and mends what pydantic gets wrong for JSON Schema.  The API is fuzzed from
this document (``tests/service/test_api_fuzz.py``): it must describe every
answer the service gives.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode

from stoker.service.apiutil import api_routes

__all__ = ["allowed_methods", "document"]


def document(
    app: FastAPI, extra: Iterable[tuple[type[BaseModel], JsonSchemaMode]] = ()
) -> dict[str, Any]:
    """FastAPI's document of ``app``, completed (computed once, then kept in ``app``).

    ``extra``: models of bodies the routes build themselves (the submission's spec, the
    log stream's events), added to the components with the JSON Schema mode given.
    """
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model, mode in extra:
        schema_of = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
        for name, definition in schema_of.pop("$defs", {}).items():
            components.setdefault(name, definition)
        components.setdefault(model.__name__, schema_of)
    # Validation errors are rendered by our handler as ErrorBody, not FastAPI's default.
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if "422" in responses:
                responses["422"] = {
                    "description": "The request does not validate.",
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}
                    },
                }
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    _array_lengths_as_items(schema)
    app.openapi_schema = schema
    return schema


def _array_lengths_as_items(node: object) -> None:
    """Rename ``minLength``/``maxLength`` of array schemas to ``minItems``/``maxItems``.

    Pydantic writes a length bound of an ``Items`` field (a tuple behind a
    ``BeforeValidator``) as a string bound, which JSON Schema ignores on
    arrays: the document would promise that ``"command": []`` is a valid step.
    """
    if isinstance(node, dict):
        if node.get("type") == "array":
            for old, new in (("minLength", "minItems"), ("maxLength", "maxItems")):
                if old in node:
                    node[new] = node.pop(old)
        for value in node.values():
            _array_lengths_as_items(value)
    elif isinstance(node, list):
        for value in node:
            _array_lengths_as_items(value)


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """The methods some route of ``app`` serves at the request's path."""
    path = request.scope["path"]
    methods: set[str] = set()
    for route in api_routes(app.routes):
        if route.path_regex.match(path):
            methods.update(route.methods)
    return sorted(methods)

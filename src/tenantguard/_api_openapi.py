"""The service's OpenAPI document, made to say what the routes really answer: errors
as problem+json, and which bearer token each route takes."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from tenantguard._api_models import Problem
from tenantguard._api_problems import PROBLEM

__all__ = ["DocumentedApp"]


class DocumentedApp(FastAPI):
    """FastAPI, with an OpenAPI document that says what the routes really answer:
    errors as problem+json, and which bearer token each route takes.

    ``documented`` are FastAPI routes that only describe a route served by something
    leaner (``POST /v1/check``): they come first in the document, in their order, and are
    never routed to."""

    documented: tuple[APIRoute, ...] = ()

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            routes = [*self.documented, *self.routes]
            schema = get_openapi(
                title=self.title, version=self.version, description=self.description,
                routes=routes,
            )  # fmt: skip
            _document(schema, routes)
            self.openapi_schema = schema
        return self.openapi_schema


_ROLE_DOC = {
    "service": "Bearer token: the service token (the admin token is accepted too).",
    "admin": "Bearer token: the admin token.",
}


def _document(schema: dict[str, Any], routes: list[Any]) -> None:
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    problem = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(problem.pop("$defs", {}))
    schemas["Problem"] = problem
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    ref = {"$ref": "#/components/schemas/Problem"}
    for route in routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        role = getattr(route, "role", None)
        for method in route.methods or ():
            operation = schema["paths"][route.path_format][method.lower()]
            responses: dict[str, Any] = operation["responses"]
            if route.body_field is not None:
                responses.setdefault("400", {"description": "`malformed_json`."})
                responses.setdefault("413", {"description": "`body_too_large`: over 64 KiB."})
            if "422" in responses or route.body_field is not None or route.dependant.path_params:
                responses["422"] = {"description": "`invalid_request`: names each field."}
            if role is not None:
                operation["security"] = [{"bearer": []}]
                operation["description"] = _ROLE_DOC[role]
                responses.setdefault("401", {"description": "`unauthorized`."})
            if role == "admin":
                responses.setdefault("403", {"description": "`forbidden`: not the admin token."})
            for status, response in responses.items():
                if status[0] in "45":
                    response["content"] = {PROBLEM: {"schema": ref}}

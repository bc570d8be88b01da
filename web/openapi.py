"""The OpenAPI 3.1 description of Mailroom's JSON API, served at ``/api/openapi.json``.

Every operation is one row of :data:`OPERATIONS`; its bodies, queries and headers are the
models of ``web/contract.py``, whose JSON Schemas pydantic generates into
``components/schemas``. Tests check that the rows and the application's routes are the same
set, and run schemathesis against the document: every documented response must match, and no
input may produce a 5xx.

The provider webhooks (``/webhooks/ses``, ``/webhooks/postmark``, ``/webhooks/sendgrid``) are
not part of this API and not in the document: their bodies are the providers' own formats,
their callers the providers, and ``web/webhooks/`` says what each accepts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any

from aiohttp import web
from pydantic import BaseModel, TypeAdapter
from pydantic.json_schema import JsonSchemaMode

from shared.metrics import VERSION
from web.contract import (
    Approved,
    AuditEntryPage,
    AuditQuery,
    Batch,
    BatchesQuery,
    BatchList,
    BatchRequest,
    Cancelled,
    CapturedMessages,
    CapturedMessageView,
    Created,
    DeadLetterPage,
    DeadLettersQuery,
    DevMessagesQuery,
    Discarded,
    DraftEdit,
    DraftSaved,
    ErrorBody,
    Health,
    IdempotencyHeaders,
    NewSuppressions,
    NewToken,
    PageQuery,
    PathIds,
    Readiness,
    RecipientPage,
    RecipientsQuery,
    Redriven,
    RemovedSuppressions,
    Selection,
    SuppressionPage,
    SuppressionsAdded,
    SuppressionsRemoved,
    TokenCreated,
    TokenList,
    TokenRevoked,
    TokensQuery,
)

routes = web.RouteTableDef()

REF_TEMPLATE = "#/components/schemas/{model}"
ERRORS = {
    400: "Malformed request (bad JSON, not UTF-8, nested too deep)",
    401: "Missing or wrong Bearer token",
    403: "Forbidden: the caller's role does not allow this (or a wrong CSRF token)",
    404: "Not found",
    409: "Conflict",
    413: "Request too large",
    415: "Not application/json",
    422: "Invalid input; details list every problem",
    429: "Too many wrong tokens from this client; see Retry-After",
}
SchemaKey = tuple[str, JsonSchemaMode]  # a model's name (or a union's repr) and its mode
_ANY_JSON = ("application/json", "object")
# Errors every operation with a JSON body can answer, besides its own.
BODY_ERRORS = (400, 413, 415, 422)


@dataclass(frozen=True)
class Operation:
    """One route of the API: what it reads and what it answers, by contract model.

    ``answers`` maps a success status to its model and description.
    ``errors`` are the error statuses it can answer besides those that follow from the rest:
    a JSON ``body`` adds :data:`BODY_ERRORS`, a ``query`` adds 422, and anything but a
    ``public`` route adds 401 and 429 (wrong tokens count toward the login limit).
    """

    method: str
    path: str
    summary: str
    answers: dict[int, tuple[type[BaseModel] | None, str]]
    errors: tuple[int, ...] = ()
    body: Any = None
    query: type[BaseModel] | None = None
    headers: type[BaseModel] | None = None
    public: bool = False
    text: bool = False  # a success without a model: plain text if set, else any JSON object

    def error_statuses(self) -> list[int]:
        statuses = set(self.errors)
        if self.body is not None:
            statuses |= set(BODY_ERRORS)
        if self.query is not None:
            statuses.add(422)
        if not self.public:
            statuses |= {401, 403, 429}
        return sorted(statuses)


OPERATIONS = [
    Operation(
        "POST",
        "/api/batches",
        "Create a batch (batch, recipients and jobs in one transaction)",
        {201: (Created, "Created"), 200: (Created, "Already created with this key")},
        errors=(409,),
        body=BatchRequest,
        headers=IdempotencyHeaders,
    ),
    Operation(
        "GET",
        "/api/batches",
        "Batches, newest first, by state and name",
        {200: (BatchList, "A page of batches")},
        query=BatchesQuery,
    ),
    Operation(
        "GET",
        "/api/batches/{batch_id}",
        "A batch with its counts",
        {200: (Batch, "The batch")},
        errors=(404,),
    ),
    Operation(
        "GET",
        "/api/batches/{batch_id}/recipients",
        "A page of a batch's recipients",
        {200: (RecipientPage, "Recipients in submission order")},
        errors=(404,),
        query=RecipientsQuery,
    ),
    Operation(
        "PATCH",
        "/api/batches/{batch_id}/recipients/{recipient_id}",
        "Edit a draft that waits for review",
        {200: (DraftSaved, "Saved")},
        errors=(404, 409),
        body=DraftEdit,
    ),
    Operation(
        "POST",
        "/api/batches/{batch_id}/cancel",
        "Cancel what is left of a batch",
        {200: (Cancelled, "Cancelled")},
        errors=(404,),
    ),
    Operation(
        "POST",
        "/api/batches/{batch_id}/send",
        "Send a batch created with send: false after review",
        {200: (Approved, "Queued")},
        errors=(404, 409),
    ),
    Operation(
        "GET",
        "/api/dead-letters",
        "Dead letters across batches",
        {200: (DeadLetterPage, "Dead letters")},
        query=DeadLettersQuery,
    ),
    Operation(
        "POST",
        "/api/dead-letters/redrive",
        "Requeue dead letters with a fresh attempt budget",
        {200: (Redriven, "Requeued")},
        body=Selection,
    ),
    Operation(
        "POST",
        "/api/dead-letters/discard",
        "Give up on dead letters (they become cancelled)",
        {200: (Discarded, "Discarded")},
        body=Selection,
    ),
    Operation(
        "GET",
        "/api/suppressions",
        "Addresses that are never sent to (unsubscribed, bounced, manual)",
        {200: (SuppressionPage, "Suppressions")},
        query=PageQuery,
    ),
    Operation(
        "POST",
        "/api/suppressions",
        "Suppress addresses: recipients of them are counted, never sent",
        {200: (SuppressionsAdded, "Suppressed")},
        body=NewSuppressions,
    ),
    Operation(
        "POST",
        "/api/suppressions/remove",
        "Allow sending to these addresses again",
        {200: (SuppressionsRemoved, "Removed")},
        body=RemovedSuppressions,
    ),
    Operation(
        "GET",
        "/api/dev/messages",
        "What the mail capture received (only in `mailroom dev`), searched and paged",
        {200: (CapturedMessages, "Captured messages, newest first")},
        errors=(404,),
        query=DevMessagesQuery,
    ),
    Operation(
        "DELETE",
        "/api/dev/messages",
        "Delete every captured message (only in `mailroom dev`)",
        {204: (None, "Deleted")},
        errors=(404,),
    ),
    Operation(
        "GET",
        "/api/dev/messages/{key}",
        "One captured message, decoded (only in `mailroom dev`)",
        {200: (CapturedMessageView, "The message's headers, parts and links")},
        errors=(404,),
    ),
    Operation(
        "GET",
        "/api/tokens",
        "The caller's personal API tokens (an admin's ?all=true: everyone's), never the tokens",
        {200: (TokenList, "Tokens, newest first")},
        query=TokensQuery,
    ),
    Operation(
        "POST",
        "/api/tokens",
        "Make a personal API token: it acts as the caller, with the caller's role",
        {201: (TokenCreated, "The token, shown this once")},
        errors=(409,),
        body=NewToken,
    ),
    Operation(
        "DELETE",
        "/api/tokens/{token_id}",
        "Revoke a personal token (the caller's own; an admin's: anyone's)",
        {200: (TokenRevoked, "Revoked")},
        errors=(404, 409),
    ),
    Operation(
        "GET",
        "/api/audit",
        "The audit log, newest first (admins)",
        {200: (AuditEntryPage, "A page of entries")},
        query=AuditQuery,
    ),
    Operation(
        "GET",
        "/api/openapi.json",
        "This document",
        {200: (None, "The OpenAPI document")},
        public=True,
    ),
    Operation("GET", "/healthz", "The process is up", {200: (Health, "Up")}, public=True),
    Operation(
        "GET",
        "/readyz",
        "Database reachable and migrations applied",
        {200: (Readiness, "Ready"), 503: (Readiness, "Not ready")},
        public=True,
    ),
    Operation(
        "GET",
        "/metrics",
        "Prometheus metrics (a Bearer MAILROOM_METRICS_TOKEN when one is set)",
        {200: (None, "Prometheus text exposition")},
        errors=(401,),
        public=True,
        text=True,
    ),
]


@cache
def document() -> dict[str, Any]:
    """The whole OpenAPI document (built once: it depends on nothing but the code)."""
    # Requests are described as they are validated, responses as they are serialized.
    inputs = {repr(o.body): o.body for o in OPERATIONS if o.body is not None}
    outputs = {m.__name__: m for o in OPERATIONS for m, _ in o.answers.values() if m is not None}
    outputs["ErrorBody"] = ErrorBody
    sources: list[tuple[SchemaKey, JsonSchemaMode, TypeAdapter[Any]]] = [
        *(((key, "validation"), "validation", TypeAdapter(t)) for key, t in inputs.items()),
        *(((key, "serialization"), "serialization", TypeAdapter(t)) for key, t in outputs.items()),
    ]
    schemas, definitions = TypeAdapter.json_schemas(sources, ref_template=REF_TEMPLATE)

    paths: dict[str, dict[str, Any]] = {}
    for operation in OPERATIONS:
        paths.setdefault(operation.path, {})[operation.method.lower()] = _operation(
            operation, schemas
        )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Mailroom",
            "version": VERSION,
            "description": "Durable batch email: create batches, follow them, handle dead letters.",
        },
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": definitions.get("$defs", {}),
        },
    }


def _operation(
    operation: Operation, schemas: dict[tuple[SchemaKey, JsonSchemaMode], Any]
) -> dict[str, Any]:
    def schema(key: str, mode: JsonSchemaMode) -> Any:
        return schemas[((key, mode), mode)]

    out: dict[str, Any] = {"summary": operation.summary}
    if operation.public:
        out["security"] = []
    parameters = [
        _parameter(name, "path", PathIds, required=True)
        for name in re.findall(r"\{(\w+)\}", operation.path)
    ]
    if operation.query is not None:
        parameters += [
            _parameter(name, "query", operation.query) for name in operation.query.model_fields
        ]
    if operation.headers is not None:
        parameters += [
            _parameter(info.alias or name, "header", operation.headers)
            for name, info in operation.headers.model_fields.items()
        ]
    if parameters:
        out["parameters"] = parameters
    if operation.body is not None:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schema(repr(operation.body), "validation")}},
        }
    responses: dict[str, Any] = {}
    for status, (model, description) in operation.answers.items():
        if status == 204:
            responses[str(status)] = {"description": description}
        elif model is None:
            media, anything = ("text/plain", "string") if operation.text else _ANY_JSON
            responses[str(status)] = {
                "description": description,
                "content": {media: {"schema": {"type": anything}}},
            }
        else:
            responses[str(status)] = _json(schema(model.__name__, "serialization"), description)
    error = schema("ErrorBody", "serialization")
    for status in operation.error_statuses():
        responses[str(status)] = _json(error, ERRORS[status])
    out["responses"] = responses
    return out


def _parameter(
    name: str, where: str, model: type[BaseModel], *, required: bool = False
) -> dict[str, Any]:
    """A parameter whose schema is the model's property ``name``, without the ``null`` a
    query or header cannot send (leaving it out is how a client says "none")."""
    properties = model.model_json_schema(ref_template=REF_TEMPLATE)["properties"]
    schema = {k: v for k, v in properties[name].items() if k not in {"title", "default"}}
    options = schema.pop("anyOf", None)
    if options is not None:
        present = [option for option in options if option.get("type") != "null"]
        schema = {**schema, **present[0]} if len(present) == 1 else {**schema, "anyOf": present}
    return {"name": name, "in": where, "required": required, "schema": schema}


def _json(schema: Any, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


@routes.get("/api/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())

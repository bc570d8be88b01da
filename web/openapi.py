"""The OpenAPI 3 description of Mailroom's JSON API, served at ``/api/openapi.json``.

Tests run schemathesis against it: every documented response must match, and no input may
produce a 5xx.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from shared.db import RECIPIENT_STATUSES, SUPPRESSION_REASONS
from shared.metrics import VERSION

routes = web.RouteTableDef()

_ERROR = {"$ref": "#/components/schemas/Error"}


_ADDRESSES = {
    "type": "array",
    "minItems": 1,
    "maxItems": 10_000,
    "items": {"type": "string", "maxLength": 254},
}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    text = {
        400: "Malformed request (bad JSON, not UTF-8, nested too deep)",
        401: "Missing or wrong Bearer token",
        403: "Forbidden (CSRF)",
        404: "Not found",
        409: "Conflict",
        413: "Request too large",
        415: "Not application/json",
        422: "Invalid input; details list every problem",
        429: "Too many wrong tokens from this client; see Retry-After",
    }
    if 401 in statuses:  # wrong tokens count toward MAILROOM_LOGIN_ATTEMPTS_PER_MINUTE
        statuses = (*statuses, 429)
    return {str(s): _json(_ERROR, text[s]) for s in statuses}


_BATCH_ID = {
    "name": "batch_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}
_PAGE = [
    {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
]
_SELECTION = {
    "oneOf": [
        {
            "type": "object",
            "required": ["ids"],
            "additionalProperties": False,
            "properties": {
                "ids": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 10000,
                    "items": {"type": "integer", "minimum": 1},
                }
            },
        },
        {
            "type": "object",
            "required": ["batch_id"],
            "additionalProperties": False,
            "properties": {"batch_id": {"type": "string", "format": "uuid"}},
        },
        {
            "type": "object",
            "required": ["all"],
            "additionalProperties": False,
            "properties": {"all": {"type": "boolean", "enum": [True]}},
        },
    ]
}

SPEC: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "Mailroom",
        "version": VERSION,
        "description": "Durable batch email: create batches, follow them, handle dead letters.",
    },
    "security": [{"bearer": []}],
    "paths": {
        "/api/batches": {
            "post": {
                "summary": "Create a batch (batch, recipients and jobs in one transaction)",
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "schema": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": 255,
                            "pattern": "^[!-~]+$",
                        },
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/NewBatch"}}
                    },
                },
                "responses": {
                    "201": _json({"$ref": "#/components/schemas/Created"}, "Created"),
                    "200": _json(
                        {"$ref": "#/components/schemas/Created"}, "Already created with this key"
                    ),
                    **_errors(400, 401, 409, 413, 415, 422),
                },
            },
            "get": {
                "summary": "Recent batches",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["batches"],
                            "properties": {
                                "batches": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/Batch"},
                                }
                            },
                        },
                        "The newest batches",
                    ),
                    **_errors(401),
                },
            },
        },
        "/api/batches/{batch_id}": {
            "get": {
                "summary": "A batch with its counts",
                "parameters": [_BATCH_ID],
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/Batch"}, "The batch"),
                    **_errors(401, 404),
                },
            }
        },
        "/api/batches/{batch_id}/recipients": {
            "get": {
                "summary": "A page of a batch's recipients",
                "parameters": [
                    _BATCH_ID,
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"type": "string", "enum": list(RECIPIENT_STATUSES)},
                    },
                    *_PAGE,
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["recipients", "next_after"],
                            "properties": {
                                "recipients": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/Recipient"},
                                },
                                "next_after": {"type": "integer", "nullable": True},
                            },
                        },
                        "Recipients in submission order",
                    ),
                    **_errors(401, 404, 422),
                },
            }
        },
        "/api/batches/{batch_id}/recipients/{recipient_id}": {
            "patch": {
                "summary": "Edit a draft that waits for review",
                "parameters": [
                    _BATCH_ID,
                    {
                        "name": "recipient_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "integer"},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["subject", "body"],
                                "additionalProperties": False,
                                "properties": {
                                    "subject": {"type": "string"},
                                    "body": {"type": "string"},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["id", "subject"],
                            "properties": {
                                "id": {"type": "integer"},
                                "subject": {"type": "string"},
                            },
                        },
                        "Saved",
                    ),
                    **_errors(400, 401, 404, 409, 413, 415, 422),
                },
            }
        },
        "/api/batches/{batch_id}/cancel": {
            "post": {
                "summary": "Cancel what is left of a batch",
                "parameters": [_BATCH_ID],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["id", "cancelled"],
                            "properties": {
                                "id": {"type": "string"},
                                "cancelled": {"type": "integer"},
                            },
                        },
                        "Cancelled",
                    ),
                    **_errors(401, 404),
                },
            }
        },
        "/api/batches/{batch_id}/send": {
            "post": {
                "summary": "Send a batch created with send: false after review",
                "parameters": [_BATCH_ID],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["id", "queued"],
                            "properties": {"id": {"type": "string"}, "queued": {"type": "integer"}},
                        },
                        "Queued",
                    ),
                    **_errors(401, 404, 409),
                },
            }
        },
        "/api/dead-letters": {
            "get": {
                "summary": "Dead letters across batches",
                "parameters": [
                    {
                        "name": "batch_id",
                        "in": "query",
                        "schema": {"type": "string", "format": "uuid"},
                    },
                    *_PAGE,
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["dead_letters", "next_after"],
                            "properties": {
                                "dead_letters": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/DeadLetter"},
                                },
                                "next_after": {"type": "integer", "nullable": True},
                            },
                        },
                        "Dead letters",
                    ),
                    **_errors(401, 422),
                },
            }
        },
        "/api/dead-letters/redrive": {
            "post": {
                "summary": "Requeue dead letters with a fresh attempt budget",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _SELECTION}},
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["redriven"],
                            "properties": {"redriven": {"type": "integer"}},
                        },
                        "Requeued",
                    ),
                    **_errors(400, 401, 413, 415, 422),
                },
            }
        },
        "/api/dead-letters/discard": {
            "post": {
                "summary": "Give up on dead letters (they become cancelled)",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _SELECTION}},
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["discarded"],
                            "properties": {"discarded": {"type": "integer"}},
                        },
                        "Discarded",
                    ),
                    **_errors(400, 401, 413, 415, 422),
                },
            }
        },
        "/api/suppressions": {
            "get": {
                "summary": "Addresses that are never sent to (unsubscribed, bounced, manual)",
                "parameters": [*_PAGE],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["suppressions", "next_after"],
                            "properties": {
                                "suppressions": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/Suppression"},
                                },
                                "next_after": {"type": "integer", "nullable": True},
                            },
                        },
                        "Suppressions",
                    ),
                    **_errors(401, 422),
                },
            },
            "post": {
                "summary": "Suppress addresses: recipients of them are counted, never sent",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["addresses"],
                                "additionalProperties": False,
                                "properties": {
                                    "addresses": _ADDRESSES,
                                    "reason": {
                                        "type": "string",
                                        "enum": list(SUPPRESSION_REASONS),
                                        "default": "manual",
                                    },
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["added", "already_suppressed"],
                            "properties": {
                                "added": {"type": "integer"},
                                "already_suppressed": {"type": "integer"},
                            },
                        },
                        "Suppressed",
                    ),
                    **_errors(400, 401, 413, 415, 422),
                },
            },
        },
        "/api/suppressions/remove": {
            "post": {
                "summary": "Allow sending to these addresses again",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["addresses"],
                                "additionalProperties": False,
                                "properties": {"addresses": _ADDRESSES},
                            }
                        }
                    },
                },
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["removed"],
                            "properties": {"removed": {"type": "integer"}},
                        },
                        "Removed",
                    ),
                    **_errors(400, 401, 413, 415, 422),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "The process is up",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "Up")},
            }
        },
        "/readyz": {
            "get": {
                "summary": "Database reachable and migrations applied",
                "security": [],
                "responses": {
                    "200": _json({"type": "object"}, "Ready"),
                    "503": _json({"type": "object"}, "Not ready"),
                },
            }
        },
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Suppression": {
                "type": "object",
                "required": ["id", "address", "reason", "created_at"],
                "properties": {
                    "id": {"type": "integer"},
                    "address": {"type": "string"},
                    "reason": {"type": "string", "enum": list(SUPPRESSION_REASONS)},
                    "detail": {"type": "string", "nullable": True},
                    "created_at": {"type": "string", "format": "date-time"},
                },
            },
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message", "details"],
                        "properties": {
                            "code": {"type": "string"},
                            "message": {"type": "string"},
                            "details": {"nullable": True},
                        },
                    }
                },
            },
            "NewBatch": {
                "type": "object",
                "required": ["recipients"],
                "properties": {
                    "recipients": {
                        "type": "array",
                        "items": {
                            "oneOf": [
                                {"type": "string", "format": "email"},
                                {
                                    "type": "object",
                                    "required": ["email"],
                                    "properties": {"email": {"type": "string"}},
                                    "additionalProperties": {"nullable": True},
                                },
                            ]
                        },
                    },
                    "subject": {
                        "type": "string",
                        "description": "jinja2 template (template drafter)",
                    },
                    "body": {"type": "string", "description": "jinja2 template (template drafter)"},
                    "drafter": {
                        "type": "string",
                        "enum": ["template", "llm"],
                        "default": "template",
                    },
                    "context": {
                        "type": "string",
                        "description": "what the LLM writes from (llm drafter)",
                    },
                    "send": {
                        "type": "boolean",
                        "default": True,
                        "description": "false: draft, then wait for review",
                    },
                    "send_at": {"type": "string", "format": "date-time"},
                },
            },
            "Created": {
                "type": "object",
                "required": ["id", "total", "status_url"],
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "total": {"type": "integer"},
                    "duplicates_removed": {"type": "integer"},
                    "status_url": {"type": "string"},
                },
            },
            "Batch": {
                "type": "object",
                "required": [
                    "id",
                    "status",
                    "total",
                    "counts",
                    "progress",
                    "drafter",
                    "created_at",
                ],
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "status": {
                        "type": "string",
                        "enum": ["queued", "sending", "awaiting_review", "done"],
                    },
                    "total": {"type": "integer"},
                    "counts": {
                        "type": "object",
                        "required": list(RECIPIENT_STATUSES),
                        "properties": {s: {"type": "integer"} for s in RECIPIENT_STATUSES},
                    },
                    "progress": {"type": "number", "minimum": 0, "maximum": 1},
                    "drafter": {"type": "string"},
                    "review": {"type": "boolean"},
                    "approved": {"type": "boolean"},
                    "tokens": {"type": "object"},
                    "send_at": {"type": "string", "nullable": True},
                    "created_at": {"type": "string", "format": "date-time"},
                },
            },
            "Recipient": {
                "type": "object",
                "required": ["id", "email", "status", "attempts"],
                "properties": {
                    "id": {"type": "integer"},
                    "email": {"type": "string"},
                    "status": {"type": "string", "enum": list(RECIPIENT_STATUSES)},
                    "attempts": {"type": "integer"},
                    "last_error": {"type": "string", "nullable": True},
                    "message_id": {"type": "string", "nullable": True},
                    "sent_at": {"type": "string", "nullable": True},
                },
            },
            "DeadLetter": {
                "type": "object",
                "required": ["id", "batch_id", "email", "attempts", "died_at"],
                "properties": {
                    "id": {"type": "integer"},
                    "batch_id": {"type": "string"},
                    "email": {"type": "string"},
                    "attempts": {"type": "integer"},
                    "last_error": {"type": "string", "nullable": True},
                    "died_at": {"type": "string"},
                },
            },
        },
    },
}


@routes.get("/api/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(SPEC)

"""The API's one error shape, ``{"error": {"code", "message", "details"}}``, and the exception
that carries it: a handler (or a helper it calls) raises :class:`ApiError`, and the error
middleware answers with :meth:`ApiError.response`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web


def api_error(status: int, code: str, message: str, details: Any = None) -> web.Response:
    """The one error shape of the API: ``{"error": {"code", "message", "details"}}``."""
    return web.json_response(
        {"error": {"code": code, "message": message, "details": details}}, status=status
    )


class ApiError(Exception):
    """An answer other than success: its status, a stable ``code``, a sentence and details."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details

    def response(self) -> web.Response:
        return api_error(self.status, self.code, self.message, self.details)

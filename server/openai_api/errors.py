"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`.

Handlers raise `ApiError`; the app's exception handlers (routes.py) turn it, Starlette's
own HTTP errors and unexpected exceptions into this shape. Pure; any thread.
"""
from __future__ import annotations

from typing import Optional

from starlette.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
          503: "service_unavailable_error"}


class ApiError(Exception):
    """An error to return to the client. `param` names the offending request field."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None, type_: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _TYPES.get(status, "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, param, code)


def invalid_value(param: str, message: str) -> ApiError:
    """400 for a bad field: the message starts with the field's name."""
    if not message.startswith(param):
        message = f"{param}: {message}"
    return ApiError(400, message, param, "invalid_value")


def not_found(what: str, ident: str, param: Optional[str] = None) -> ApiError:
    return ApiError(404, f"No such {what}: {ident!r}", param, f"{what}_not_found")

"""Errors as OpenAI's API writes them: ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException


class APIError(Exception):
    """A request the server refuses; the message is one line naming the fix."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(" ".join(message.split()))
        self.status, self.param, self.code = status, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        return error_response(self.status, str(self), kind=self.kind, param=self.param, code=self.code)


def error_response(status: int, message: str, *, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_message(error: dict) -> tuple[str, str | None]:
    """A pydantic error as (one-line message, dotted parameter name)."""
    loc = [str(p) for p in error.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    msg = str(error.get("msg", "invalid value"))
    if error.get("type") == "extra_forbidden":
        msg = "unknown field; check its spelling against /v1/audio/speech's parameters"
    elif error.get("type") == "missing":
        msg = "required field is missing"
    return (f"{param}: {msg}" if param else msg), param


def install_handlers(app) -> None:
    """Every error leaves as OpenAI-style JSON, never as an HTML page or a traceback."""

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = validation_message(error.errors()[0])
        return error_response(400, message, param=param, code="invalid_value")

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, error: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        message = "no such endpoint; see GET /v1/models and POST /v1/audio/speech" if error.status_code == 404 \
            else str(error.detail)
        return error_response(error.status_code, message, code=code)

    @app.exception_handler(Exception)
    async def _bug(_request: Request, error: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(error).__name__}: {' '.join(str(error).split())[:200]}",
                              kind="server_error")

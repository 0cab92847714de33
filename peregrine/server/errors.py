"""OpenAI-shaped errors: one exception type and the JSON body every error response carries."""

from __future__ import annotations

import re
from http import HTTPStatus

from fastapi.responses import JSONResponse

from peregrine.server.protocol import ErrorInfo, ErrorResponse

# SamplingParams / EngineConfig messages start with the parameter they are about.
_PARAM_AT_START = re.compile(r"^([a-z_]+) (?:must|keys|values)\b")


class APIError(Exception):
    """An error to send back as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str | None = None,
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _default_type(status)
        self.param = param
        self.code = code
        self.headers = headers

    def response(self) -> JSONResponse:
        """The JSON response of this error."""
        return error_response(self.status, self.message, self.type, self.param, self.code,
                              self.headers)


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_response(status: int, message: str, type: str | None = None, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None
                   ) -> JSONResponse:
    """A JSONResponse in OpenAI's error shape."""
    body = ErrorResponse(error=ErrorInfo(message=message, type=type or _default_type(status),
                                         param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def bad_request(error: ValueError | str, param: str | None = None) -> APIError:
    """A 400 for a ValueError from validation; the parameter is read off the message."""
    message = str(error)
    if param is None:
        m = _PARAM_AT_START.match(message)
        if m:
            param = m.group(1)
        elif "max_tokens" in message:  # "the prompt (N tokens) plus max_tokens (M) ..."
            param = "max_tokens"
    return APIError(HTTPStatus.BAD_REQUEST, message, param=param)

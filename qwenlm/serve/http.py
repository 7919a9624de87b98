"""The server's HTTP layer below the routes: errors in the OpenAI error schema, and two plain ASGI
middlewares (the request body limit; the API-key gate, which also counts requests)."""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: request bodies over `limit` bytes get a 413 before they are parsed."""

    class _TooLarge(Exception):
        pass

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_large = error_response(413, f"request body over {self.limit} bytes", "invalid_request_error")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_large(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise self._TooLarge
            return msg
        try:
            await self.app(scope, limited, send)
        except self._TooLarge:
            await too_large(scope, receive, send)


class Gate:
    """ASGI middleware: the API key check (every path but `open_paths`) and the request counter.
    A plain ASGI wrapper on purpose: starlette's `BaseHTTPMiddleware` relays every chunk of a streamed
    reply through an extra task and memory stream, which cost the server more than the chunks."""

    def __init__(self, app, api_key: str | None, open_paths: set[str], metrics):
        self.app, self.api_key, self.open_paths, self.metrics = app, api_key, open_paths, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.api_key and path not in self.open_paths:
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                self.metrics.errors.labels("401").inc()
                reply = error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                                       "authentication_error", code="invalid_api_key",
                                       headers={"WWW-Authenticate": "Bearer"})
                return await reply(scope, receive, send)
        route = path if path.startswith("/v1/") else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)

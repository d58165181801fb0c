"""The service's pure-ASGI middleware: request metrics, body limits, draining, admin auth, a JSON 500."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from fastapi.responses import JSONResponse

from vocdet.serve.state import State

log = logging.getLogger("vocdet.serve")


class ServeMiddleware:
    """Pure ASGI: request metrics, body size limits (Content-Length and streamed), 503 while draining, and a
    JSON 500 for anything unexpected."""

    def __init__(self, app: Any, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st, start = self.state, time.perf_counter()
        status = {"code": 500}
        started = {"yes": False}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                started["yes"] = True
            await send(message)

        path, method = scope["path"], scope["method"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        admin = path == "/models" and method == "POST"
        limit = int((st.s.admin_max_model_mb if admin else st.s.max_upload_mb) * 1024 * 1024)
        try:
            if st.draining and path not in ("/healthz", "/metrics"):
                await _json(
                    send_wrapper, 503, "the server is shutting down", {"Retry-After": "5", "Connection": "close"}
                )
            elif admin and not self._authorised(headers):
                await _unauthorised(send_wrapper)
            elif _content_length(headers) > limit:
                await _json(send_wrapper, 413, f"request body over the {limit / 2**20:g} MB limit")
            else:
                received = {"n": 0}

                async def limited_receive() -> dict:
                    message = await receive()
                    if message["type"] == "http.request":
                        received["n"] += len(message.get("body", b""))
                        if received["n"] > limit:
                            raise _TooLarge
                    return message

                await self.app(scope, limited_receive, send_wrapper)
        except _TooLarge:
            if not started["yes"]:
                await _json(send_wrapper, 413, f"request body over the {limit / 2**20:g} MB limit")
        except Exception:
            log.exception("unhandled error on %s %s", method, path)
            if not started["yes"]:
                await _json(send_wrapper, 500, "internal error (logged on the server)")
        finally:
            label = getattr(scope.get("route"), "path", None) or "unmatched"  # templates: bounded label values
            st.metrics.requests.labels(label, method, str(status["code"])).inc()
            st.metrics.request_seconds.labels(label).observe(time.perf_counter() - start)

    def _authorised(self, headers: dict[str, str]) -> bool:
        token = self.state.admin_token
        if token is None:
            return True  # the route answers 403 (disabled)
        scheme, _, given = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), token.encode())


class _TooLarge(Exception):
    pass


def _content_length(headers: dict[str, str]) -> int:
    try:
        return int(headers.get("content-length", "0"))
    except ValueError:
        return 0


async def _json(send: Callable, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = JSONResponse({"detail": detail}).body
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _unauthorised(send: Callable) -> None:
    await _json(
        send,
        401,
        "a valid 'Authorization: Bearer <serve.admin_token>' header is required",
        {"WWW-Authenticate": "Bearer"},
    )

"""One error envelope for every failure, and the ASGI middleware that applies it to every response.

    {"error": {"message": "n: Input should be less than or equal to 16", "type": "invalid_request_error",
               "param": "n", "code": null}}

OpenAI's own envelope: its client raises ``openai.BadRequestError``, ``AuthenticationError``, ... from it.

``ApiError`` is a failure with its status and envelope; ``from_validation`` and ``from_exception`` make one
from a pydantic error or any exception (the details go to the server log, not to the client). ``Envelope``
is the outermost of the API's middlewares (service/service.py): it rewrites any error response not
already in the envelope (BentoML's, the probes', a 404) into it and counts it, so that no traceback, path
or framework message in another shape reaches a client. What is refused at the door (401, 405, 413, 503,
400 for a body invalid against its request model): service/admission.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from http import HTTPStatus
from typing import Any

from pydantic import ValidationError

from service import auth
from service.bentoml_compat import connection_error, error_message, error_status

log = logging.getLogger("bentoml.glowing")  # under "bentoml": shown by BentoML's logging config
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
         415: "unsupported_media_type", 429: "overloaded", 500: "internal_error", 503: "overloaded",
         504: "timeout"}
UNION_MEMBER = re.compile(r"[\[\-]")  # pydantic's loc for a member of a union: "constrained-str", "list[str]"
TYPE_NAMES = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or TYPES.get(status, "error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        from starlette.responses import JSONResponse

        headers = {"Retry-After": "1"} if self.status == 503 else None
        if self.status == 401:
            headers = {auth.CHALLENGE[0].decode(): auth.CHALLENGE[1].decode()}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def field_name(loc: tuple) -> str | None:
    """``("texts", 3)`` -> ``"texts[3]"``; pydantic's own wrappers (json, model names, the members of a
    union: ``("prompt", "list[constrained-str]", 0)`` -> ``"prompt[0]"``) are dropped."""
    name = ""
    for part in loc:
        if isinstance(part, str) and (UNION_MEMBER.search(part) or part in TYPE_NAMES):
            continue
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += f".{part}" if name else str(part)
    return name or None


def from_validation(err: ValidationError) -> ApiError:
    errors = err.errors(include_url=False, include_context=False, include_input=False)
    parts = []
    for e in errors:
        name = field_name(e["loc"])
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{name}: {msg}" if name else msg)
    return ApiError(400, "; ".join(parts), field_name(errors[0]["loc"]) if errors else None,
                    code=errors[0]["type"] if errors else None)


def from_exception(err: BaseException) -> ApiError:
    """The client's view of a failure inside an endpoint; the details go to the server log only."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, ValidationError):
        return from_validation(err)
    if isinstance(err, (asyncio.TimeoutError, TimeoutError)):
        return ApiError(504, "the request did not finish in time; ask for fewer or shorter reviews, or retry")
    if connection_error(err):
        log.error("a model service is unreachable", exc_info=err)
        return ApiError(503, "a model service is unavailable; retry later")
    status = error_status(err)  # BentoML between services
    if status in (429, 503):
        return ApiError(503, "the models are overloaded; retry later")
    if status == 504:
        return ApiError(504, "the models did not answer in time; retry later")
    log.error("internal error", exc_info=err)
    return ApiError(500, "internal error; the server log has the details")


class Envelope:
    """ASGI middleware: every error response in the envelope, counted by endpoint (``paths``: the API's
    paths; any other is counted as "other") and type."""

    def __init__(self, app, paths: frozenset[str]):
        self.app, self.paths = app, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.paths else "other"

        def envelope(body: bytes, status: int) -> bytes:
            err = _as_envelope(status, body)
            _count(endpoint, err["error"]["type"])
            return json.dumps(err).encode()

        return await self.app(scope, receive, rewritten(send, envelope, errors=True))


def rewritten(send, transform, errors: bool = False, media: bytes = b"application/json"):
    """``send`` that buffers a whole response (errors only, or successes only) and sends
    ``transform(body[, status])`` instead, as ``media``."""
    state: dict[str, Any] = {}

    async def wrapped(message):
        if message["type"] == "http.response.start" and (message["status"] >= 400) == errors:
            state["start"], state["body"] = message, b""
            return
        if "start" not in state or message["type"] != "http.response.body":
            return await send(message)
        state["body"] += message.get("body", b"")
        if message.get("more_body", False):
            return
        status = state["start"]["status"]
        body = transform(state["body"], status) if errors else transform(state["body"])
        headers = [(k, v) for k, v in state["start"]["headers"] if k not in (b"content-length", b"content-type")]
        headers += [(b"content-type", media), (b"content-length", str(len(body)).encode())]
        await send({**state["start"], "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return wrapped


def _as_envelope(status: int, body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        data = body.decode("utf-8", errors="replace").strip()
    if isinstance(data, dict) and isinstance(data.get("error"), dict) and "message" in data["error"]:
        return data  # ours already
    message = error_message(data)
    if not isinstance(message, str) or not message or "Traceback" in message or len(message) > 300:
        message = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
    return ApiError(status, message).body()


def _count(endpoint: str, type: str) -> None:
    try:
        from service import metrics

        metrics.get().errors.labels(endpoint=endpoint, type=type).inc()
    except Exception:  # metrics must never turn an error response into a crash
        log.debug("could not count an error", exc_info=True)

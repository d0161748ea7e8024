"""One error envelope for every failure, and the ASGI guard that applies it at the door.

    {"error": {"message": "n: Input should be less than or equal to 16", "type": "invalid_request_error",
               "param": "n", "code": null}}

OpenAI's own envelope: its client raises ``openai.BadRequestError``, ``AuthenticationError``, ... from it.

``Guard`` sits in front of every path. It answers 401 without the API key when one is configured
(service/auth.py: every path but the liveness and readiness probes), sheds load beyond
``max_concurrency`` requests in flight with 503 (BentoML's own limiter answers 429), rejects bodies
that are too large, not JSON or invalid against the request model with 4xx *before* BentoML sees
them (BentoML would answer its own shape and log a traceback per bad request), forwards them as
JSON, serves ``GET /info`` through the ``POST /info`` endpoint, and rewrites any other error response
(the probes' included) into the envelope, so that no traceback, path or framework message in another
shape reaches a client. ``GET /playground`` is the page to try the API in a browser (public: the key is
typed into the page and kept in its memory). ``GET /`` (BentoML's OpenAPI page) gets Glowing's title and loses
BentoML's Google Tag Manager. service/openapi.py makes ``/docs.json`` say all this.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from http import HTTPStatus
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from service import auth
from service.bentoml_compat import connection_error, error_message, error_status, index_page

log = logging.getLogger("bentoml.glowing")  # under "bentoml": shown by BentoML's logging config
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
         415: "unsupported_media_type", 429: "overloaded", 500: "internal_error", 503: "overloaded",
         504: "timeout"}
OPENAPI_PATH = "/docs.json"
UNION_MEMBER = re.compile(r"[\[\-]")  # pydantic's loc for a member of a union: "constrained-str", "list[str]"
TYPE_NAMES = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})
SYSTEM_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})  # BentoML's answers, errors enveloped
PLAYGROUND = Path(__file__).parent / "playground.html"  # GET /playground (auth.PLAYGROUND_PATH): public, holds no secret


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


class Guard:
    """ASGI middleware; ``models`` maps each API path to its request model."""

    def __init__(self, app, models: dict[str, type[BaseModel]], max_concurrency: int, max_body_bytes: int,
                 get_paths: frozenset[str] = frozenset({"/info"}), api_key: bytes = b""):
        self.app = app
        self.api_key = api_key
        self.models = models
        self.max_concurrency = max_concurrency
        self.max_body_bytes = max_body_bytes
        self.get_paths = get_paths
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        model = self.models.get(scope["path"])
        send = self._enveloped(scope["path"] if model else "other", send)
        if not auth.authorized(scope, self.api_key):
            return await ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
                                  ).response()(scope, receive, send)
        if scope["path"] == auth.PLAYGROUND_PATH:
            return await self._playground(scope, receive, send)
        if scope["path"] in SYSTEM_PATHS:  # only their errors change (405 on POST /livez, 503 from /readyz)
            return await self.app(scope, receive, send)
        if scope["path"] == OPENAPI_PATH:
            from service.openapi import document

            send = self._rewritten(send, lambda body: json.dumps(document(json.loads(body), self)).encode())
        if scope["path"] == "/" and scope["method"] == "GET":
            send = self._rewritten(send, index_page, media=b"text/html; charset=utf-8")
        if model is None:  # docs, static files; unknown paths come back 404 in the envelope
            return await self.app(scope, receive, send)
        try:
            body = await self._admit(scope, receive, model)
        except ApiError as err:
            return await err.response()(scope, receive, send)
        # Validated JSON goes on as JSON whatever it was labelled (`curl -d` says form-urlencoded).
        scope = {**scope, "method": "POST",
                 "headers": [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"content-type")]
                 + [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        self.in_flight += 1
        try:
            await self.app(scope, replay, send)
        finally:
            self.in_flight -= 1

    @staticmethod
    async def _playground(scope, receive, send):
        """The page to try the API in a browser (service/playground.html: no build, nothing fetched)."""
        from starlette.responses import Response

        if scope["method"] not in ("GET", "HEAD"):
            return await ApiError(405, f"{scope['method']} {scope['path']}: use GET").response()(scope, receive, send)
        response = Response(PLAYGROUND.read_bytes(), media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})
        return await response(scope, receive, send)

    async def _admit(self, scope, receive, model: type[BaseModel]) -> bytes:
        method, path = scope["method"], scope["path"]
        if method == "GET" and path in self.get_paths:
            return b"{}"
        if method != "POST":
            raise ApiError(405, f"{method} {path}: use POST" + (" or GET" if path in self.get_paths else ""))
        if self.in_flight >= self.max_concurrency:
            raise ApiError(503, f"the server is at its limit of {self.max_concurrency} concurrent requests; "
                                "retry later")
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise ApiError(413, f"the body is larger than {self.max_body_bytes} bytes")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ApiError(400, "the client disconnected")
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                raise ApiError(413, f"the body is larger than {self.max_body_bytes} bytes")
            more = message.get("more_body", False)
        body = b"".join(chunks) or b"{}"
        try:
            model.model_validate_json(body)
        except ValidationError as err:
            raise from_validation(err) from None
        return body

    def _enveloped(self, endpoint: str, send):
        """``send`` that turns any error response not already in the envelope into one."""
        def envelope(body: bytes, status: int) -> bytes:
            err = _as_envelope(status, body)
            _count(endpoint, err["error"]["type"])
            return json.dumps(err).encode()

        return self._rewritten(send, envelope, errors=True)

    @staticmethod
    def _rewritten(send, transform, errors: bool = False, media: bytes = b"application/json"):
        """``send`` that buffers a whole JSON response (errors only, or successes only) and sends
        ``transform(body[, status])`` instead."""
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

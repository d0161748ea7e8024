"""Admission: who may call, how many at once, and what they may send, decided before BentoML sees a request.

``Admission`` is the API's ASGI middleware after the envelope (service/service.py). In order, it

- answers 401 without the API key when one is configured (service/auth.py: every path but the liveness
  and readiness probes and the playground page);
- on an API path (``models`` maps each to its request model): answers 405 to another method than POST
  (GET too for ``get_paths``: ``GET /info`` is served by the ``POST /info`` endpoint), sheds load beyond
  ``max_concurrency`` requests in flight with 503 (BentoML's own limiter answers 429), refuses a body over
  ``max_body_bytes`` with 413, and validates the body against the request model, once: a body that is
  not JSON or invalid answers 400 naming the field (BentoML would answer its own shape and log a
  traceback per bad request);
- forwards an admitted request as a JSON POST with the validated request model in the scope
  (``bentoml_compat.VALIDATED``), where the endpoint takes it instead of parsing the body again
  (``bentoml_compat.api``).

Every other path goes on unchanged (service/openapi.py serves the documents, BentoML the rest).
"""

from __future__ import annotations

from pydantic import BaseModel, ValidationError

from service import auth
from service.bentoml_compat import VALIDATED
from service.errors import ApiError, from_validation


class Admission:
    def __init__(self, app, models: dict[str, type[BaseModel]], max_concurrency: int, max_body_bytes: int,
                 get_paths: frozenset[str] = frozenset({"/info"}), api_key: bytes = b""):
        self.app = app
        self.models = models
        self.max_concurrency = max_concurrency
        self.max_body_bytes = max_body_bytes
        self.get_paths = get_paths
        self.api_key = api_key
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not auth.authorized(scope, self.api_key):
            return await ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
                                  ).response()(scope, receive, send)
        model = self.models.get(scope["path"])
        if model is None:  # the probes, the documents, static files; unknown paths come back 404
            return await self.app(scope, receive, send)
        try:
            body, request = await self._admit(scope, receive, model)
        except ApiError as err:
            return await err.response()(scope, receive, send)
        # Validated JSON goes on as JSON whatever it was labelled (`curl -d` says form-urlencoded).
        scope = {**scope, "method": "POST", VALIDATED: request,
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

    async def _admit(self, scope, receive, model: type[BaseModel]) -> tuple[bytes, BaseModel]:
        method, path = scope["method"], scope["path"]
        if method == "GET" and path in self.get_paths:
            body = b"{}"
        elif method != "POST":
            raise ApiError(405, f"{method} {path}: use POST" + (" or GET" if path in self.get_paths else ""))
        else:
            body = await self._body(scope, receive)
        try:
            return body, model.model_validate_json(body)
        except ValidationError as err:
            raise from_validation(err) from None

    async def _body(self, scope, receive) -> bytes:
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
        return b"".join(chunks) or b"{}"

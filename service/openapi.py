"""The documents a client or a browser reads: BentoML's OpenAPI document (``/docs.json``) made true of this
server, its OpenAPI page (``GET /``) with Glowing's title, and the playground (``GET /playground``, the page
to try the API in a browser: public, the key is typed into the page and kept in its memory). ``Docs`` is
the API's ASGI middleware after admission (service/service.py).

BentoML writes an OpenAPI 3.0 document from the pydantic models but leaves traces of JSON Schema
2020 in it and drops what it cannot express; a client generator or a fuzzer (schemathesis, in the
test suite) then believes things the server does not do. Fixed here: errors in the envelope, the
statuses admission adds (401 with a key, 405, 413, 503, 504), the GET variant of ``/info``, bearer
authentication when a key is configured, numeric ``exclusiveMinimum`` (3.0 wants ``minimum`` plus a
boolean), fields whose default is null marked ``nullable``, and a required body where the request
model has required fields.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from service import auth
from service.bentoml_compat import ERROR_SCHEMAS, index_page
from service.errors import TYPES, ApiError, rewritten

OPENAPI_PATH = "/docs.json"
PLAYGROUND = Path(__file__).parent / "playground.html"  # GET /playground (auth.PLAYGROUND_PATH): public, holds no secret

ENVELOPE_SCHEMA = {
    "type": "object", "required": ["error"], "description": "Every error, whatever its status",
    "properties": {"error": {"type": "object", "required": ["message", "type", "param"], "properties": {
        "message": {"type": "string", "description": "what is wrong, naming the field"},
        "type": {"type": "string", "enum": sorted(set(TYPES.values()))},
        "param": {"type": "string", "nullable": True, "description": "the offending field, e.g. texts[3]"},
        "code": {"type": "string", "nullable": True, "description": "a machine-readable reason, e.g. "
                 "less_than_equal, extra_forbidden, model_not_found"}}}},
    "example": {"error": {"message": "n: Input should be less than or equal to 16", "type": "invalid_request_error",
                          "param": "n"}}}
REF = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
EXTRA = {"405": "Method Not Allowed", "413": "Payload Too Large (the body exceeds the request limits)",
         "503": "Overloaded: too many requests in flight, retry after the Retry-After header",
         "504": "The request did not finish within the timeout"}


def _event_stream(data: str) -> dict:
    return {"schema": {"type": "object", "required": ["data"], "description": "one Server-Sent Event", "properties": {
        "data": {"type": "string", "description": data + "; [DONE] last. An error after the start is "
                 '{"error": {...}}, the last event'},
        "event": {"type": "string"}, "id": {"type": "string"}}}}


# "stream": true answers Server-Sent Events (service/streaming.py)
EVENT_STREAM = _event_stream('{"index", "delta"} as tokens are made; {"index", "text", "p_positive", "label", '
                             '"finish_reason", "seed"} when a review ends')
STREAMS = {"/generate": EVENT_STREAM,
           "/reviews": _event_stream('{"index", "candidate", "text", "p_positive", "label", "finish_reason"} per '
                                     'accepted review once its place is settled; then {"complete", "seed", "stats", "scores"} '
                                     '(scores: {"candidate", "p_positive"} per scored candidate, accepted or not)'),
           "/v1/completions": _event_stream('OpenAI completion chunks {"id", "object", "created", "model", '
                                            '"choices": [{"text", "index", "logprobs", "finish_reason", '
                                            '"p_positive"}]}')}
STREAMING_PATHS = frozenset(STREAMS)
NOT_FOUND = {"/v1/completions": {"404": {"description": "No such model (param model, code model_not_found)", **REF}}}
UNAUTHORIZED = {"401": {"description": "Missing or wrong API key (Authorization: Bearer <key>)", **REF}}


def info() -> dict[str, str]:
    """Glowing's title, description and version for the OpenAPI page (``/``), instead of BentoML's."""
    from importlib import metadata

    try:
        version = metadata.version("glowing")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"title": "Glowing", "version": version, "description":
            "Positive movie reviews: a small GPT-2 writes candidates, a classifier scores them (P(positive)). "
            "Try it in the browser at [/playground](/playground). Every error answers "
            '`{"error": {"message", "type", "param", "code"}}`.'}


class Docs:
    """ASGI middleware: ``/docs.json`` rewritten by ``document``, ``GET /`` with Glowing's title and no tracker,
    ``/playground`` served; ``models`` maps each API path to its request model."""

    def __init__(self, app, models: dict[str, type[BaseModel]], get_paths: frozenset[str] = frozenset({"/info"}),
                 api_key: bytes = b""):
        self.app, self.models, self.get_paths, self.api_key = app, models, get_paths, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] == auth.PLAYGROUND_PATH:
            return await _playground(scope, receive, send)
        if scope["path"] == OPENAPI_PATH:
            send = rewritten(send, lambda body: json.dumps(
                document(json.loads(body), self.models, self.get_paths, self.api_key)).encode())
        if scope["path"] == "/" and scope["method"] == "GET":
            send = rewritten(send, index_page, media=b"text/html; charset=utf-8")
        return await self.app(scope, receive, send)


async def _playground(scope, receive, send):
    """The page to try the API in a browser (service/playground.html: no build, nothing fetched)."""
    from starlette.responses import Response

    if scope["method"] not in ("GET", "HEAD"):
        return await ApiError(405, f"{scope['method']} {scope['path']}: use GET").response()(scope, receive, send)
    response = Response(PLAYGROUND.read_bytes(), media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})
    return await response(scope, receive, send)


def document(spec: dict[str, Any], models: dict[str, type[BaseModel]], get_paths: frozenset[str],
             api_key: bytes = b"") -> dict[str, Any]:
    spec["info"] = {**spec.get("info", {}), **info()}
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = ENVELOPE_SCHEMA
    for name in ERROR_SCHEMAS:  # BentoML's error shapes (bentoml_compat: error-schemas)
        schemas[name] = {**ENVELOPE_SCHEMA, "title": name}
    for name, schema in list(schemas.items()):  # response models too: a null default is nullable
        if name != "Error" and name not in ERROR_SCHEMAS:
            _openapi30(schema)
    for path, model in models.items():
        item = spec.get("paths", {}).get(path)
        if not item or "post" not in item:
            continue
        post = item["post"]
        post.setdefault("responses", {}).update({code: {"description": d, **REF} for code, d in EXTRA.items()})
        body = post.get("requestBody")
        if body is not None:
            body["required"] = any(f.is_required() for f in model.model_fields.values())
            for media in body.get("content", {}).values():
                _openapi30(media.get("schema", {}))
        if path in STREAMING_PATHS and "200" in post["responses"]:
            post["responses"]["200"].setdefault("content", {})["text/event-stream"] = STREAMS[path]
        post["responses"].update(NOT_FOUND.get(path, {}))
        if path in get_paths:
            item["get"] = {k: v for k, v in post.items() if k != "requestBody"}
            item["get"]["operationId"] = f"{post.get('operationId', path.strip('/'))}__get"
    if api_key:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, item in spec.get("paths", {}).items():
            for operation in item.values():
                if path in auth.PUBLIC_PATHS:
                    operation["security"] = []
                else:
                    operation["security"] = [{"bearer": []}]
                    operation.setdefault("responses", {}).update(UNAUTHORIZED)
    return spec


def _openapi30(schema: dict[str, Any]) -> None:
    """JSON Schema 2020 bounds to OpenAPI 3.0, and null defaults to ``nullable``, in place."""
    for field in schema.get("properties", {}).values():
        for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
            value = field.get(bound)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                field[plain], field[bound] = value, True
        if "default" in field and field["default"] is None:
            field["nullable"] = True
            if field.get("type") == "null":  # a field that is always null (OpenAI's logprobs here)
                del field["type"]

"""Every workaround for BentoML in one place, behind one version check.

Each one is named, says what BentoML does, and has a test in tests/test_bentoml_compat.py that
demonstrates the upstream behaviour on the installed BentoML: when an upgrade fixes it, that test fails
and says which workaround to delete. After an upgrade, run ``pytest tests/test_bentoml_compat.py``.

- ``timeout-timers``: BentoML's ``TimeoutMiddleware`` schedules one timer per request
  (``loop.call_later(timeout, ...)``) and never cancels it; until it fires, ``timeout`` seconds later, it
  keeps the request's future and contextvars (the OpenTelemetry span, BentoML's trace context) alive:
  memory that grows with request rate x timeout (found by the soak: docs/LOADTESTS.md, "Soak"). Patched: the timer is cancelled when the request
  ends; the behaviour is otherwise BentoML's own (``_timeout_call`` is a copy of 1.4.39's).
- ``abandoned-streams``: its client to a streaming dependency (``_bentoml_impl/client/proxy2.py``,
  aiohttp) never closes the HTTP response when the consumer stops early (cancelled, a client gone, a
  timeout): the connection stays open until the garbage collector finds the response, so the model
  service never sees a disconnect and generates on for nobody (a whole /reviews round generated for
  nobody). Patched: the response is closed as soon as its stream is left.
- ``schema-per-response``: the media type of an endpoint's answer, when the endpoint returns a plain
  type (the model services' ``list[float]``), is found by building the type's whole JSON schema with a new
  pydantic ``TypeAdapter``, again for every response (``IOMixin.mime_type``): a tenth of the scorer
  process's request handling under load (docs/SERVING.md). Patched: computed once per class.
- ``unsampled-spans``: BentoML's sampler records every span it does not sample (``RECORD_ONLY``, its
  ``ParentBasedTraceIdRatio``), at the default ``tracing.sample_rate`` of 0 too: OpenTelemetry's ASGI
  middleware builds a recorded span for each request and for each message it sends or receives (every
  streamed event), with their attribute and event lists, and nothing ever exports them: about a tenth
  of the API process's CPU under /score load (docs/SERVING.md). Patched: at a sample rate of 0 an
  unsampled span is not recorded (its trace and span ids still exist, for the logs); a caller that
  sampled the trace (``traceparent``) is still honoured, and any rate above 0 keeps BentoML's sampler.
- ``one-session``: its client to a model service replaces its HTTP session every 100 requests and every
  300 s and closes the old one under the requests still in flight: under load some failed and had to be
  retried, and some never got their answer (a 504 after the whole timeout; docs/LOADTESTS.md,
  "Soak"). The model services are local workers: ``RUNNER_CONNECTION`` keeps one long-lived session, and
  ``retrying`` repeats a model call whose connection broke before its answer.
- ``connection-closed``: aiohttp (BentoML's client) raises a bare ``RuntimeError("Connection closed.")``
  when the connection closes while an answer is being read; ``connection_error`` recognises it by its text.
- ``list-wrapped-4xx``: BentoML answers a 4xx ``BentoMLException`` as ``[{"error": message}]`` (a
  one-element list: a stray comma in ``_bentoml_impl/server/app.py``); ``error_message`` unwraps it.
- ``error-schemas``: BentoML's OpenAPI document describes its own error shapes (``InvalidArgument``,
  ``NotFound``, ``InternalServerError``) where ours answer; ``ERROR_SCHEMAS`` names them for
  service/openapi.py, read from BentoML itself.
- ``index-page``: BentoML's OpenAPI page (``GET /``) has BentoML's title and loads Google Tag Manager from
  the internet; ``index_page`` gives it Glowing's title and removes the tracker.
- ``half-gpu``: BentoML's allocator gives each service asking for ``{"gpu": 1}`` a GPU of its own: on a
  one-GPU pod the second model service is sent to a GPU 1 that does not exist. ``gpu_resources`` asks for
  half a GPU each, which the allocator places on the same device.

One adapter, not a fix: ``api`` declares an endpoint that takes its validated request model, ``async def
score(self, request: ScoreRequest)``. BentoML hands a request model to an endpoint as keyword arguments
(one per field; a root input, which would arrive whole, changes BentoML's Python client to take one
positional argument), and parses and validates the body itself: ``api`` gives the endpoint the model that
service/admission.py validated (``VALIDATED`` in the ASGI scope) and puts keyword calls (BentoML's, or
in-process ones: ``svc.score(texts=[...])``) back into the model without validating them again.

The four patches (``timeout-timers``, ``abandoned-streams``, ``schema-per-response``, ``unsampled-spans``) replace or wrap
BentoML code as ``TESTED`` has it: on another release they are left off (a copy could undo its fixes)
and a warning says so.
The other workarounds are values and readers that are harmless on any release.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from typing import Any

log = logging.getLogger("bentoml.glowing")  # under "bentoml": shown by BentoML's logging config

TESTED = "1.4.39"  # the BentoML release these workarounds were written for and tested against
ORIGINAL: dict[str, Any] = {}  # BentoML's own functions, kept when patched (tests/test_bentoml_compat.py)


def supported() -> bool:
    import bentoml

    return bentoml.__version__ == TESTED


def apply() -> bool:
    """Apply the patches when BentoML is the release they were copied from; True when patched.
    Called when service/service.py is imported (in every worker); applying twice is harmless."""
    import bentoml

    if not supported():
        log.warning("service/bentoml_compat.py: written for BentoML %s, running %s: its patches (timeout-timers, "
                    "abandoned-streams, schema-per-response, unsampled-spans) are left off; run tests/test_bentoml_compat.py to see "
                    "which workarounds are still needed", TESTED, bentoml.__version__)
        return False
    _patch_timeout_timers()
    _patch_abandoned_streams()
    _patch_schema_per_response()
    _patch_unsampled_spans()
    return True


# ---- timeout-timers ---------------------------------------------------------------------------------

async def _timeout_call(self, scope, receive, send) -> None:
    from starlette.responses import JSONResponse

    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

    async def _send(message) -> None:
        if not waiter.done():
            waiter.set_result(None)
        await send(message)

    fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
    try:
        await waiter
    except asyncio.TimeoutError:
        if fut.cancel():
            resp = JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                status_code=504)
            await resp(scope, receive, send)
    else:
        await fut
    finally:
        timer.cancel()


def _patch_timeout_timers() -> None:
    from bentoml._internal.server.http import traffic

    ORIGINAL.setdefault("TimeoutMiddleware.__call__", traffic.TimeoutMiddleware.__call__)
    traffic.TimeoutMiddleware.__call__ = _timeout_call


# ---- abandoned-streams ------------------------------------------------------------------------------

def _patch_abandoned_streams() -> None:
    import inspect

    from _bentoml_impl.client import proxy2
    from _bentoml_impl.serde import Payload

    async def _get_stream(self, endpoint, args, kwargs):
        resp = await self._call(endpoint, args, kwargs)
        assert inspect.isasyncgen(resp)
        try:
            async for data in resp:
                yield data
        finally:
            await resp.aclose()  # the inner stream's own finally closes the connection, now, not at GC

    async def _parse_stream_response(self, endpoint, resp):
        try:
            async for data in resp.content.iter_chunked(1024 * 8):
                yield self._deserialize_output(Payload((data,), resp.headers), endpoint)
        finally:  # a complete body frees the connection for reuse; an abandoned one closes it
            resp.release() if resp.content.at_eof() else resp.close()

    ORIGINAL.setdefault("AsyncClient._get_stream", proxy2.AsyncClient._get_stream)
    ORIGINAL.setdefault("AsyncClient._parse_stream_response", proxy2.AsyncClient._parse_stream_response)
    proxy2.AsyncClient._get_stream = _get_stream
    proxy2.AsyncClient._parse_stream_response = _parse_stream_response


# ---- schema-per-response ---------------------------------------------------------------------------

def _patch_schema_per_response() -> None:
    from _bentoml_sdk.io_models import IOMixin

    if "IOMixin.mime_type" in ORIGINAL:
        return
    original = ORIGINAL.setdefault("IOMixin.mime_type", IOMixin.mime_type).__func__
    known: dict[type, str] = {}

    def mime_type(cls) -> str:
        if cls not in known:
            known[cls] = original(cls)
        return known[cls]

    IOMixin.mime_type = classmethod(mime_type)


# ---- unsampled-spans -------------------------------------------------------------------------------

def _patch_unsampled_spans() -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

    from bentoml._internal.utils import telemetry

    if "ParentBasedTraceIdRatio" in ORIGINAL:
        return
    original = ORIGINAL.setdefault("ParentBasedTraceIdRatio", telemetry.ParentBasedTraceIdRatio)

    class ParentBasedTraceIdRatio(original):  # read by BentoML when it makes its tracer provider
        def __init__(self, rate: float):
            if rate > 0:
                super().__init__(rate)
                return
            # A span nobody samples is not recorded: its ids still exist (logs keep their trace id),
            # its attributes and events are not built. A caller that sampled the trace is still honoured.
            ParentBased.__init__(self, root=ALWAYS_OFF, remote_parent_sampled=ALWAYS_ON,
                                 remote_parent_not_sampled=ALWAYS_OFF, local_parent_sampled=ALWAYS_ON,
                                 local_parent_not_sampled=ALWAYS_OFF)

    telemetry.ParentBasedTraceIdRatio = ParentBasedTraceIdRatio


# ---- one-session, connection-closed -----------------------------------------------------------------

RUNNER_CONNECTION = {"max_requests": 2**31 - 1, "max_age": 1e9}  # @bentoml.service(runner_connection=...)


def connection_error(err: BaseException) -> bool:
    """A connection to a model service broke (aiohttp is BentoML's client between services; it raises a
    bare RuntimeError when the connection closes while an answer is being read)."""
    if isinstance(err, RuntimeError) and str(err) == "Connection closed.":
        return True
    try:
        import aiohttp
    except ImportError:
        return False
    return isinstance(err, aiohttp.ClientConnectionError)


async def retrying(call, batch: list, attempts: int = 3):
    """``call(batch)`` again when the connection to the model service broke before an answer.

    BentoML's client can close its HTTP session under requests still in flight (one-session), which then
    fail with ServerDisconnectedError, or RuntimeError("Connection closed.") while reading the answer.
    Both model calls are safe to repeat: scoring is a pure function, and generation is seeded per row."""
    for attempt in range(attempts):
        try:
            return await call(batch)
        except Exception as err:
            if not connection_error(err) or attempt == attempts - 1:
                raise
            log.warning("connection to a model service lost (attempt %d of %d); retrying", attempt + 1, attempts)


# ---- list-wrapped-4xx -------------------------------------------------------------------------------

def error_message(data: Any) -> Any:
    """The message of a BentoML error body: ``[{"error": "..."}]`` (a 4xx) or ``{"error": "..."}``."""
    if isinstance(data, list) and len(data) == 1:
        data = data[0]
    return data.get("error") if isinstance(data, dict) else data


def error_status(err: BaseException) -> int:
    """The HTTP status of a BentoML error between services (its ``error_code``), 0 for another error."""
    return int(getattr(getattr(err, "error_code", None), "value", 0) or 0)


# ---- error-schemas ----------------------------------------------------------------------------------

def _error_schemas() -> tuple[str, ...]:
    try:
        from _bentoml_sdk.service.openapi import error_responses

        refs = [r.content["application/json"].schema.ref for r in error_responses.values()]
        return tuple(sorted(ref.rpartition("/")[2] for ref in refs))
    except Exception:  # another layout: the names 1.4.39 uses
        return ("InternalServerError", "InvalidArgument", "NotFound")


ERROR_SCHEMAS = _error_schemas()


# ---- index-page -------------------------------------------------------------------------------------

INDEX_TITLE = (re.compile(rb"<title>[^<]*</title>"), b"<title>Glowing API</title>")
INDEX_TRACKER = re.compile(rb"<!-- Google Tag Manager( \(noscript\))? -->.*?<!-- End Google Tag Manager( \(noscript\))? -->",
                           re.S)


def index_page(body: bytes) -> bytes:
    return INDEX_TRACKER.sub(b"", INDEX_TITLE[0].sub(INDEX_TITLE[1], body, count=1))


# ---- half-gpu ---------------------------------------------------------------------------------------

def gpu_resources(device: str) -> dict | None:
    """``resources`` of each model service: half a GPU each on CUDA, so that both share the one device."""
    return {"gpu": 0.5} if device == "cuda" else None


# ---- the typed request ------------------------------------------------------------------------------

VALIDATED = "glowing.request"  # the ASGI scope key of the request model instance admission validated


class _Validated:
    """An input spec's body parser: the instance admission validated, else BentoML's own parsing."""

    @classmethod
    async def from_http_request(cls, request, serde):
        validated = request.scope.get(VALIDATED)
        if validated is not None:
            return validated
        return await super().from_http_request(request, serde)


def validated_input(model):
    """``@bentoml.api(input_spec=...)`` for ``model``: the schema BentoML derives from it is unchanged (the
    class is named as BentoML names its own: ``<model>IODescriptor``), the body is not validated again."""
    from _bentoml_sdk.io_models import IOMixin
    from pydantic import create_model

    return create_model(f"{model.__name__}IODescriptor", __base__=(_Validated, IOMixin, model),
                        __module__=model.__module__)


def api(route: str, model, **options):
    """``@bentoml.api`` for an endpoint ``async def name(self, request: model)``: BentoML's keyword call
    (one argument per field) becomes the one request model again, built without a second validation."""
    import bentoml

    def decorate(endpoint):
        @functools.wraps(endpoint)
        async def keywords(self, *request, **fields):
            return await endpoint(self, request[0] if request else model.model_construct(**fields))

        return bentoml.api(route=route, input_spec=validated_input(model), **options)(keywords)

    return decorate

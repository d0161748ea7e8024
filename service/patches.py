"""Fixes to BentoML 1.4.39, applied when service/service.py is imported (in every worker).

1. Its client to a streaming dependency (``_bentoml_impl/client/proxy2.py``, aiohttp) never closes
the HTTP response when the consumer stops early (cancelled, a client gone, a timeout): the
connection stays open until the garbage collector finds the response, so the model service never
sees a disconnect and generates on for nobody (measured: a whole /reviews round, seconds of work).
Here the response is closed as soon as its stream is left, and the dependency cancels its work.

2. Its ``TimeoutMiddleware`` schedules one timer per request (``loop.call_later(timeout, ...)``) and
never cancels it. Until the timer fires, ``timeout`` seconds later, it keeps the request's future and
its contextvars (the OpenTelemetry span, BentoML's trace context) alive: memory that grows with
request rate x timeout (about 80 MiB in the API worker at 125 req/s and a 130 s timeout, the soak's
step in README "Reliability"). Here the timer is cancelled when the request ends; the behaviour is
otherwise BentoML's own.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.responses import JSONResponse


async def _call(self, scope, receive, send) -> None:
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


PATCHED_VERSION = "1.4.39"  # the BentoML release _call copies; another one keeps its own middleware


def apply() -> bool:
    """Patch BentoML when it is the release this copy was made from; True when patched."""
    import bentoml
    from bentoml._internal.server.http import traffic

    if bentoml.__version__ != PATCHED_VERSION:
        # A copy of another release's middleware could undo its fixes: check whether the leak is
        # still there (tests/test_reliability_units.py) and update PATCHED_VERSION and _call.
        logging.getLogger("bentoml.glowing").warning(
            "service/patches.py: BentoML %s is not %s, its TimeoutMiddleware is left unpatched",
            bentoml.__version__, PATCHED_VERSION)
        return False
    traffic.TimeoutMiddleware.__call__ = _call
    _close_abandoned_streams()
    return True


def _close_abandoned_streams() -> None:
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

    proxy2.AsyncClient._get_stream = _get_stream
    proxy2.AsyncClient._parse_stream_response = _parse_stream_response

"""A fix to BentoML 1.4.39, applied when service/service.py is imported (in every worker).

Its ``TimeoutMiddleware`` schedules one timer per request (``loop.call_later(timeout, ...)``) and
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
    return True

"""Work stops when its client leaves: an ASGI middleware that cancels a request's handler when the
client disconnects before the response is complete.

Neither uvicorn nor BentoML cancel a handler whose client went away (only a streaming response
notices, at its next chunk): an abandoned /reviews kept the generator busy for minutes. Here the
handler runs in its own task; a disconnect while the body is still arriving cancels it at once,
and once the body has been read, a watcher waits for ``http.disconnect`` and cancels that task. Cancellation then travels the ordinary way: the API's
awaits on the model services are cancelled, their HTTP connections closed, and the model
services (which run this middleware too) cancel their handlers in turn: the generator's rows
leave its engine at the next step and queued scoring is dropped.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("bentoml.glowing")


class CancelOnDisconnect:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        gone = asyncio.Event()
        state = {"complete": False, "watcher": None}
        handler: asyncio.Task | None = None

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    if not state["complete"] and handler is not None and not handler.done():
                        log.info("%s: the client went away; cancelling its work", scope.get("path"))
                        handler.cancel()
                    return

        async def receive_() -> dict:
            if state["watcher"] is not None:  # the body has been read: only a disconnect can follow
                await gone.wait()
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.set()
                if handler is not None and not handler.done():
                    # gone while its request was still arriving (a caller cancelled mid-body): nobody waits
                    # for an answer, and the framework would fail on the half body with a traceback
                    log.info("%s: the client went away before its request arrived; cancelling", scope.get("path"))
                    handler.cancel()
                    if asyncio.current_task() is handler:
                        await asyncio.sleep(0)  # the cancellation lands here, before anyone reads a half body
            elif not message.get("more_body", False):
                state["watcher"] = asyncio.ensure_future(watch())
            return message

        async def send_(message: dict) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                state["complete"] = True
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, receive_, send_))
        try:
            await handler
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not gone.is_set() or (current is not None and current.cancelling()):
                raise  # cancelled from outside, not by the client leaving
        finally:
            if state["watcher"] is not None:
                state["watcher"].cancel()

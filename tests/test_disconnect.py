"""service/disconnect.py: a handler whose client leaves is cancelled, before or after its body arrived."""

from __future__ import annotations

import asyncio

from service.disconnect import CancelOnDisconnect


def _run(messages: list[dict], app) -> list[str]:
    events: list[str] = []

    async def main() -> None:
        queue: asyncio.Queue = asyncio.Queue()
        for m in messages:
            queue.put_nowait(m)

        async def receive() -> dict:
            return await queue.get()

        async def send(message: dict) -> None:
            events.append(message["type"])

        await CancelOnDisconnect(app(events))({"type": "http", "path": "/stream"}, receive, send)

    asyncio.run(main())
    return events


def reading_app(events: list[str]):
    async def app(scope, receive, send) -> None:
        try:
            while True:
                message = await receive()
                events.append(f"app got {message['type']}")
                if message["type"] == "http.disconnect":
                    raise RuntimeError("a half body: the framework would log a traceback here")
                if not message.get("more_body"):
                    break
            await asyncio.sleep(10)  # the work
            await send({"type": "http.response.start", "status": 200})
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
    return app


def test_a_client_gone_mid_body_cancels_the_handler_before_it_reads_a_half_body():
    events = _run([{"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"}],
                  reading_app)
    assert events == ["app got http.request", "cancelled"]  # no error, nothing sent


def test_a_client_gone_after_its_body_cancels_the_work():
    events = _run([{"type": "http.request", "body": b"{}", "more_body": False}, {"type": "http.disconnect"}],
                  reading_app)
    assert events == ["app got http.request", "cancelled"]

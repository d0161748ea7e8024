"""Token streams between the services and to the client (no BentoML, no model here).

Generator service -> API: one line of ASCII JSON per engine step that changed the request, a list of
row events ``[index, delta, finish, tokens]`` (``finish`` null while the row runs, else stop, length,
cancelled or error; ``tokens`` the row's tokens generated so far). ASCII, so that a chunk cut anywhere by the transport still decodes; the API
reassembles lines (``read_lines``).

API -> client (``"stream": true``): Server-Sent Events as OpenAI-style clients read them, one JSON
object per ``data:`` line, ``data: [DONE]`` at the end; an error after the stream started is one
``{"error": {...}}`` event, then the stream closes.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
from typing import Any, AsyncIterator, Awaitable, Callable

from glowing.runtime.engine import ERROR, AsyncEngine, IncrementalDetokenizer
from glowing.runtime.sampling import SamplingSettings

DONE = "data: [DONE]\n\n"


class GeneratorFailed(RuntimeError):
    """The generator service failed a request's rows, or its stream broke off."""


def error_line(message: str) -> str:
    return json.dumps({"error": message}) + "\n"


def sse(event: dict[str, Any]) -> str:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"


async def engine_lines(engine: AsyncEngine, tokenizer, prompt: str, rows: list[SamplingSettings],
                       deltas: bool = True, progress: int = 0) -> AsyncIterator[str]:
    """The generator service's side: the engine's updates as text-delta lines. Without ``deltas``
    (nobody reads tokens as they come) a row's whole text is its one event, when it ends, and with
    ``progress`` an empty event every ``progress`` tokens tells how far it got (/reviews counts the
    tokens of the candidates it cancels)."""
    detok = [IncrementalDetokenizer(tokenizer) for _ in rows]
    tokens = [0] * len(rows)
    async with aclosing(engine.generate(prompt, rows, stream=deltas or progress > 0)) as steps:
        async for updates in steps:
            events: dict[int, list] = {}  # one event per row and line: its deltas of every step in it
            for u in updates:
                if u.tokens is not None:  # not streamed: the row's tokens come with its end
                    detok[u.index].ids.extend(u.tokens)
                    tokens[u.index] = len(u.tokens)
                    delta = ""
                elif not deltas:  # streamed for its progress only: the text comes at the end
                    tokens[u.index] += u.token is not None
                    if u.token is not None:
                        detok[u.index].ids.append(u.token)
                    delta = ""
                else:
                    tokens[u.index] += u.token is not None
                    delta = detok[u.index].add(u.token) if u.token is not None else ""
                if u.finish is not None and u.finish != ERROR:
                    delta += detok[u.index].finish()
                if delta or u.finish is not None or (progress and u.token is not None
                                                     and tokens[u.index] % progress == 0):
                    if u.index in events:
                        events[u.index][1] += delta
                        events[u.index][2:] = [u.finish, tokens[u.index]]
                    else:
                        events[u.index] = [u.index, delta, u.finish, tokens[u.index]]
            if events:
                yield json.dumps(list(events.values())) + "\n"  # ensure_ascii: see the module docstring


async def read_lines(chunks: AsyncIterator[str]) -> AsyncIterator[list]:
    """The API's side: row events from the generator service's chunks, whatever their cuts."""
    buffer = ""
    async with aclosing(chunks) as stream:
        async for chunk in stream:
            buffer += chunk
            *lines, buffer = buffer.split("\n")
            for line in lines:
                if line:
                    yield json.loads(line)


async def scored_rows(events: AsyncIterator[list], prompt: str, n: int,
                      score: Callable[[list[str]], Awaitable[list[float]]]) -> AsyncIterator[dict]:
    """Deltas as they come, ``{"index", "delta"}``; each row, once it ends, scored on its own (the
    scorer batches across requests) and sent as ``{"index", "text", "p_positive", "finish_reason", "tokens"}``
    where ``text`` is the prompt and the whole continuation, ``tokens`` its count. Every row ends with its final event."""
    out: asyncio.Queue = asyncio.Queue()
    texts, tokens = [""] * n, [0] * n
    finals = 0

    async def finish(ended: list[tuple[int, str]]) -> None:  # the rows that ended in one step, scored together
        done = [(index, prompt + texts[index], reason) for index, reason in ended]
        for (index, text, reason), p in zip(done, await score([text for _, text, _ in done]), strict=True):
            out.put_nowait({"index": index, "text": text, "p_positive": p, "finish_reason": reason,
                            "tokens": tokens[index]})

    async def produce() -> None:
        scoring, finished = [], 0
        try:
            async with aclosing(events) as rows:
                async for step in rows:
                    if isinstance(step, dict):  # {"error": ...}: the generator failed these rows
                        raise GeneratorFailed(step.get("error", "the generator failed"))
                    ended = []
                    for index, delta, reason, *count in step:
                        tokens[index] = count[0] if count else tokens[index]
                        if delta:
                            texts[index] += delta
                            out.put_nowait({"index": index, "delta": delta})
                        if reason is not None:
                            ended.append((index, reason))
                    if ended:
                        finished += len(ended)
                        scoring.append(asyncio.ensure_future(finish(ended)))
            if finished < n:
                raise GeneratorFailed(f"the generator's stream ended after {finished} of {n} rows")
            await asyncio.gather(*scoring)
        finally:
            for task in scoring:
                task.cancel()

    def relay(task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            out.put_nowait(task.exception())

    producer = asyncio.ensure_future(produce())
    producer.add_done_callback(relay)
    try:
        while finals < n:
            item = await out.get()
            if isinstance(item, BaseException):
                raise item
            finals += "text" in item
            yield item
    finally:
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)

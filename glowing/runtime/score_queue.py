"""Zero-wait batching of scoring requests in front of one ``Scorer``, for an asyncio server.

    queue = ScoreQueue(scorer, max_texts=64, on_call=lambda rows, padded, real: ...)
    scores = await queue.score(["A wonderful film.", "Dull."])   # P(positive), in input order
    await queue.aclose()

One consumer task feeds the model. When the model is free it takes every request queued, whole,
up to ``max_texts`` texts, and scores the take on ONE dedicated worker thread (tokenization
included, so the event loop stays free): ``Scorer.logits_from_ids`` sorts the texts by length and
splits them into model calls with ``plan_calls``. Each request then gets its own scores, in its
own order. Nothing waits for company: a lone request goes to the model at once, and requests that
arrive while the model is busy form the next take (Triton's dynamic batcher with no queue delay,
TEI's continuous batching for a padded model).

- A request of more than ``max_texts`` texts is never split: it makes a take on its own (the
  planner still splits it into calls), so its scores come from one computation and it fails or
  is dropped as a whole. The HTTP boundary bounds how many texts a request may hold.
- A request whose awaiting task is cancelled (a client that timed out) before its take is
  formed is dropped, never computed; cancelled later, its take still computes it and its scores
  are discarded.
- An exception in the take's computation fails the requests of that take only; the queue keeps
  serving the next ones.
- ``on_call(rows, padded_positions, real_tokens)`` runs after every model call, on the worker
  thread (a histogram of padding per call is ``1 - real_tokens / padded_positions``).

A text's score does not depend on its batch partners: the scorer right-pads every call.
Not thread-safe: use one queue from one event loop. No HTTP here.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from glowing.runtime.scorer import OnCall, Scorer

log = logging.getLogger("glowing.runtime")


class QueueClosed(RuntimeError):
    """The queue was closed before this request was scored."""


@dataclass
class _Request:
    texts: list[str]
    future: asyncio.Future


class ScoreQueue:
    def __init__(self, scorer: Scorer, *, max_texts: int, on_call: OnCall | None = None):
        if max_texts < 1:
            raise ValueError(f"max_texts={max_texts}: must be >= 1")
        self.scorer = scorer
        self.max_texts = max_texts
        self._on_call = on_call
        self._pending: collections.deque[_Request] = collections.deque()
        self._worker = ThreadPoolExecutor(1, "glowing-score-queue")
        self._wake: asyncio.Event | None = None
        self._consumer: asyncio.Task | None = None
        self._closed = False

    async def score(self, texts: list[str]) -> list[float]:
        """P(positive) per text, in input order, computed with whatever else is queued."""
        if self._closed:
            raise QueueClosed("the score queue is closed")
        if not texts:
            return []
        loop = asyncio.get_running_loop()
        if self._consumer is None:
            self._wake = asyncio.Event()
            self._consumer = loop.create_task(self._consume(), name="glowing-score-queue")
        elif self._consumer.get_loop() is not loop:
            raise RuntimeError("a ScoreQueue serves the event loop it was first used from")
        request = _Request(list(texts), loop.create_future())
        self._pending.append(request)
        self._wake.set()
        # Cancelling the caller cancels this future too: the consumer then skips the request.
        return await request.future

    def pending(self) -> int:
        """Texts queued and not yet taken (cancelled requests included until the next take)."""
        return sum(len(r.texts) for r in self._pending)

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while take := self._take():
                texts = [t for r in take for t in r.texts]
                try:
                    scores = await loop.run_in_executor(self._worker, self._compute, texts)
                except asyncio.CancelledError:
                    _fail(take, QueueClosed("the score queue was closed during this request's computation"))
                    raise
                except Exception as err:  # a model error: fail this take, keep serving
                    log.exception("scoring %d texts of %d request(s) failed", len(texts), len(take))
                    _fail(take, err)
                    continue
                start = 0
                for request in take:
                    end = start + len(request.texts)
                    if not request.future.done():
                        request.future.set_result(scores[start:end])
                    start = end

    def _take(self) -> list[_Request]:
        """Whole requests from the front of the queue, up to ``max_texts`` texts (at least one request)."""
        take: list[_Request] = []
        size = 0
        while self._pending:
            request = self._pending[0]
            if request.future.done():  # cancelled while queued: dropped
                self._pending.popleft()
                continue
            if take and size + len(request.texts) > self.max_texts:
                break
            take.append(self._pending.popleft())
            size += len(request.texts)
        return take

    def _compute(self, texts: list[str]) -> list[float]:
        scorer = self.scorer
        return scorer.probabilities(scorer.logits_from_ids(scorer.encode(texts), on_call=self._on_call))

    def close(self) -> None:
        """Stop: queued requests fail with ``QueueClosed``, the consumer is cancelled, the worker
        thread ends after the model call it is in. Call it from the event loop's thread."""
        self._closed = True
        _fail(list(self._pending), QueueClosed("the score queue was closed before this request was scored"))
        self._pending.clear()
        if self._consumer is not None and not self._consumer.get_loop().is_closed():
            self._consumer.cancel()
        self._worker.shutdown(wait=False)

    async def aclose(self) -> None:
        """``close()``, then wait until the consumer has stopped."""
        self.close()
        if self._consumer is not None and self._consumer.get_loop() is asyncio.get_running_loop():
            await asyncio.gather(self._consumer, return_exceptions=True)


def _fail(requests: list[_Request], err: BaseException) -> None:
    for request in requests:
        if not request.future.done():
            request.future.set_exception(err)

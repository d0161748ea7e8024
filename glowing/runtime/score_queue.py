"""INTERIM (replaced by the issue-20 branch): zero-wait scoring queue."""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor


class ScoreQueue:
    def __init__(self, scorer, *, max_texts: int, on_call=None):
        self._scorer, self._max = scorer, max_texts
        self._pending: deque = deque()
        self._wake = asyncio.Event()
        self._thread = ThreadPoolExecutor(1, "glowing-score")
        self._task = None

    async def score(self, texts: list[str]) -> list[float]:
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((texts, fut))
        self._wake.set()
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                take, count = [], 0
                while self._pending and (count == 0 or count + len(self._pending[0][0]) <= self._max):
                    texts, fut = self._pending.popleft()
                    if fut.cancelled():
                        continue
                    take.append((texts, fut))
                    count += len(texts)
                if not take:
                    continue
                flat = [t for texts, _ in take for t in texts]
                try:
                    scores = await loop.run_in_executor(self._thread, self._scorer.score, flat)
                except Exception as err:
                    for _, fut in take:
                        if not fut.done():
                            fut.set_exception(err)
                    continue
                i = 0
                for texts, fut in take:
                    if not fut.done():
                        fut.set_result(scores[i : i + len(texts)])
                    i += len(texts)

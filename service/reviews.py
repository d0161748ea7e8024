"""``/reviews``: generate candidates, score them, keep the positive ones (no BentoML here).

Two ways, chosen by ``GLOWING_REVIEWS``: ``pipeline`` (the default, ``Pipeline`` below: candidates
stream through the engine and each is scored as soon as it ends) and ``rounds`` (the previous way,
``collect_reviews``, kept for comparison):

Each round generates a number of candidates sized from the acceptance rate seen so far (a prior
of 1 in 2 before the first round), at least the number still missing and at most
``round_cap`` and the budget left. Round ``r`` is seeded with ``derive_seed(seed, "round", r)``,
so a seeded request replays exactly: the same rounds, the same candidates, the same answer.

Duplicates and blank candidates count against the budget but are never accepted twice: with
temperature 0 every candidate is the same text, and the answer holds one review.
"""

from __future__ import annotations

import asyncio
import math
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from service.batching import derive_seed

PRIOR_RATE = 0.5  # the acceptance rate assumed before anything was scored
MIN_RATE = 0.1  # a round never plans for a rate below this: at most 10x the missing reviews
PSEUDO = 2  # the pipeline's prior weighs as much as this many scored candidates

GenerateRound = Callable[[int, int], Awaitable[list[str]]]  # (count, round seed) -> candidate texts
Score = Callable[[list[str]], Awaitable[list[float]]]  # texts -> p_positive, in order


@dataclass
class Outcome:
    reviews: list[tuple[str, float]] = field(default_factory=list)  # best first
    complete: bool = False
    candidates: int = 0
    accepted: int = 0
    rounds: int = 0  # rounds, or the pipeline's waves
    cancelled: int = 0  # candidates cancelled before they ended (pipeline)
    scored: int = 0  # candidates scored (pipeline)
    passed: int = 0  # of which at or above min_positive, accepted or not (pipeline)
    tokens: int = 0  # tokens generated for all candidates
    wasted_tokens: int = 0  # of which for candidates that were rejected or cancelled
    elapsed_s: float = 0.0
    scores: list[dict] | None = None  # {"candidate", "p_positive"} per scored candidate, in order (pipeline)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.candidates if self.candidates else 0.0


def round_size(need: int, generated: int, accepted: int, budget_left: int, cap: int) -> int:
    rate = accepted / generated if generated else PRIOR_RATE
    wanted = math.ceil(need / max(rate, MIN_RATE))
    return max(1, min(max(need, wanted), cap, budget_left))


async def collect_reviews(generate: GenerateRound, score: Score, *, n: int, min_positive: float,
                          max_candidates: int, seed: int, round_cap: int) -> Outcome:
    started = time.perf_counter()
    out = Outcome()
    accepted: dict[str, float] = {}  # text -> p_positive, in acceptance order
    while len(accepted) < n and out.candidates < max_candidates:
        size = round_size(n - len(accepted), out.candidates, len(accepted), max_candidates - out.candidates,
                          round_cap)
        texts = await generate(size, derive_seed(seed, "round", out.rounds))
        out.candidates += len(texts)
        out.rounds += 1
        fresh = list(dict.fromkeys(t for t in texts if t.strip() and t not in accepted))
        for text, p in zip(fresh, await score(fresh) if fresh else [], strict=True):
            if p >= min_positive:
                accepted[text] = p
    out.accepted = len(accepted)
    out.complete = out.accepted >= n
    out.reviews = sorted(accepted.items(), key=lambda kv: -kv[1])[:n]
    out.elapsed_s = time.perf_counter() - started
    return out


# ---- the pipeline (GLOWING_REVIEWS=pipeline) --------------------------------------------------

# (first candidate, count) -> (candidate index, its text once it ended else None, tokens generated so far
# [, its finish reason])
_DETACHED: set[asyncio.Task] = set()  # scoring calls that outlive their request (kept from the GC)
Rows = Callable[[int, int], AsyncIterator[tuple[int, "str | None", int]]]


@dataclass(frozen=True)
class Accepted:
    place: int  # its position in the answer
    candidate: int  # its candidate index
    text: str
    p_positive: float
    finish_reason: str | None = None


@dataclass
class Pipeline:
    """One ``/reviews`` request as a generate-then-score pipeline; ``run()`` yields each ``Accepted``
    review once its place is settled, then the ``Outcome``.

    Candidate ``i`` is a row of its own seed (the caller's ``rows`` derives it from the request's seed
    and ``i``), so its text and score do not depend on when it ran or with whom. The answer is the first
    ``n`` passing candidates in candidate order, which makes it a function of the seed alone: candidate
    ``i`` is settled once every candidate before it is scored. Candidates are launched in waves (one
    ``rows`` call each), enough in flight to expect the missing reviews at the acceptance rate seen so
    far (smoothed with ``prior``), at most ``cap`` in flight and ``max_candidates`` in all. Once ``n`` passing
    candidates are known, those after the n-th cannot enter the answer: their waves are cancelled."""

    rows: Rows
    score: Score
    n: int
    min_positive: float
    max_candidates: int
    cap: int
    prior: float = PRIOR_RATE  # the acceptance rate expected before this request's first score
    out: Outcome = field(default_factory=Outcome)

    async def run(self) -> AsyncIterator[Accepted | Outcome]:
        started = time.perf_counter()
        self._events: asyncio.Queue = asyncio.Queue()
        self._waves: list[tuple[int, int, asyncio.Task]] = []  # (first, count, task)
        self._scoring: set[asyncio.Task] = set()
        self._launched = 0
        self._tokens: dict[int, int] = {}
        self._finish: dict[int, str | None] = {}
        self._decided: dict[int, tuple[str, float] | None] = {}  # None: blank, never scored
        self._cut = self.max_candidates  # candidates from here on cannot enter the answer
        accepted: list[Accepted] = []
        seen: set[str] = set()
        settled = 0
        try:
            self._plan()
            while len(accepted) < self.n and settled < self._cut:
                event = await self._events.get()
                if isinstance(event, BaseException):
                    raise event
                index, decision = event
                self._decided[index] = decision
                while settled in self._decided and len(accepted) < self.n:  # candidate order
                    decision = self._decided[settled]
                    if decision is not None and decision[1] >= self.min_positive and decision[0] not in seen:
                        seen.add(decision[0])
                        accepted.append(Accepted(len(accepted), settled, *decision[:2],
                                                 self._finish.get(settled)))
                        yield accepted[-1]
                    settled += 1
                self._update_cut()
                self._plan()
        finally:
            for _, _, task in self._waves:
                task.cancel()
            # Scoring calls still in flight are left to end: they are short, and a call cancelled while
            # its body is on the way makes the scorer log a traceback (ClientDisconnect).
            _DETACHED.update(self._scoring)
            await asyncio.gather(*(t for _, _, t in self._waves), return_exceptions=True)
        kept = {a.candidate for a in accepted}
        out = self.out
        out.reviews = [(a.text, a.p_positive) for a in accepted]
        out.accepted, out.complete = len(accepted), len(accepted) >= self.n
        out.candidates, out.rounds = self._launched, len(self._waves)
        out.cancelled = self._launched - len(self._decided)
        out.scored = len(self._decided)
        out.scores = [{"candidate": i, "p_positive": d[1]} for i, d in sorted(self._decided.items()) if d is not None]
        out.passed = sum(d is not None and d[1] >= self.min_positive for d in self._decided.values())
        out.tokens = sum(self._tokens.values())
        out.wasted_tokens = sum(t for i, t in self._tokens.items() if i not in kept)
        out.elapsed_s = time.perf_counter() - started
        yield out

    def _plan(self) -> None:
        """Launch a wave when at most half the candidates that the missing reviews need are in flight
        (not one wave per rejection: each wave is a call to the generator)."""
        scored = list(self._decided.values())
        passed = len({d[0] for d in scored if d is not None and d[1] >= self.min_positive})
        in_flight = self._launched - len(self._decided)
        if passed >= self.n or self._launched >= self._cut:
            return
        # the prior counts as PSEUDO candidates: one early rejection must not read as a rate of 0
        rate = max((passed + self.prior * PSEUDO) / (len(scored) + PSEUDO), MIN_RATE)
        need = self.n - passed
        target = max(1, min(max(need, math.ceil(need / rate)), self.cap, self._cut - self._launched + in_flight))
        if in_flight == 0 or 2 * in_flight <= target:
            count = max(1, min(target - in_flight, self.cap - in_flight, self._cut - self._launched))
            first, self._launched = self._launched, self._launched + count
            self._waves.append((first, count, asyncio.ensure_future(self._wave(first, count))))

    def _update_cut(self) -> None:
        """The n-th distinct passing text among the scored candidates bounds the answer: a candidate
        before it that passes later can only take an earlier place (the same text scores the same)."""
        seen: set[str] = set()
        for index in sorted(self._decided):
            d = self._decided[index]
            if d is not None and d[1] >= self.min_positive and d[0] not in seen:
                seen.add(d[0])
                if len(seen) == self.n:
                    self._cut = min(self._cut, index + 1)
                    break
        for first, count, task in self._waves:  # waves with nothing left before the cut
            if not task.done() and all(i in self._decided or i >= self._cut for i in range(first, first + count)):
                task.cancel()

    async def _wave(self, first: int, count: int) -> None:
        ended = 0
        try:
            async with aclosing(self.rows(first, count)) as rows:
                async for index, text, tokens, *finish in rows:
                    self._tokens[index] = tokens
                    if text is not None:
                        self._finish[index] = finish[0] if finish else None
                        ended += 1
                        task = asyncio.ensure_future(self._score_one(index, text))
                        self._scoring.add(task)
                        task.add_done_callback(self._scoring.discard)
                        task.add_done_callback(_DETACHED.discard)
            if ended < count:
                raise RuntimeError(f"the generator's stream ended after {ended} of {count} candidates")
        except asyncio.CancelledError:
            raise
        except BaseException as err:
            self._events.put_nowait(err)

    async def _score_one(self, index: int, text: str) -> None:
        try:
            if not text.strip():
                self._events.put_nowait((index, None))
                return
            [p] = await self.score([text])
            self._events.put_nowait((index, (text, p)))
        except asyncio.CancelledError:
            raise
        except BaseException as err:
            self._events.put_nowait(err)

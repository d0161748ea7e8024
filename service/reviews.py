"""``/reviews``: generate candidates in rounds, score them, keep the positive ones (no BentoML here).

Each round generates a number of candidates sized from the acceptance rate seen so far (a prior
of 1 in 2 before the first round), at least the number still missing and at most
``round_cap`` and the budget left. Round ``r`` is seeded with ``derive_seed(seed, "round", r)``,
so a seeded request replays exactly: the same rounds, the same candidates, the same answer.

Duplicates and blank candidates count against the budget but are never accepted twice: with
temperature 0 every candidate is the same text, and the answer holds one review.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from service.batching import derive_seed

PRIOR_RATE = 0.5  # the acceptance rate assumed before anything was scored
MIN_RATE = 0.1  # a round never plans for a rate below this: at most 10x the missing reviews

GenerateRound = Callable[[int, int], Awaitable[list[str]]]  # (count, round seed) -> candidate texts
Score = Callable[[list[str]], Awaitable[list[float]]]  # texts -> p_positive, in order


@dataclass
class Outcome:
    reviews: list[tuple[str, float]] = field(default_factory=list)  # best first
    complete: bool = False
    candidates: int = 0
    accepted: int = 0
    rounds: int = 0
    elapsed_s: float = 0.0

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

"""How a merged generation batch becomes model calls, and back (no BentoML, no model).

BentoML's dispatcher merges the ``GenerationItem`` lists of concurrent requests into one list.
Each item asks for ``n`` continuations of its prompt with its own sampling settings; row ``i``
of an item is sampled with ``derive_seed(item.seed, i)``, so a seeded request gets the same
reviews whoever shares its batch, and the first k rows of ``n=5`` are the rows of ``n=k``.

Compatible rows share one runtime call: the runtime takes per-row settings (temperature, top-p,
top-k, length, seed), so the only split is greedy rows apart from sampled ones (an all-greedy
call takes the vectorised argmax path). Within a group, rows are ordered by prompt length so
that a call pads little, and calls hold at most ``max_rows`` rows.
"""

from __future__ import annotations

import hashlib
import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

from glowing.runtime.sampling import SamplingSettings
from service.schemas import GenerationItem


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from its parts, stable across processes and Python versions (unlike hash())."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)


@dataclass(frozen=True)
class Row:
    item: int  # index of its item in the merged batch
    index: int  # its position among the item's n rows
    prompt: str
    settings: SamplingSettings


def expand(items: Sequence[GenerationItem]) -> list[Row]:
    return [Row(k, i, item.prompt, SamplingSettings(max_new_tokens=item.max_new_tokens, temperature=item.temperature,
                                                    top_p=item.top_p, top_k=item.top_k,
                                                    seed=derive_seed(item.seed, item.first_row + i)))
            for k, item in enumerate(items) for i in range(item.n)]


def plan(rows: Sequence[Row], max_rows: int) -> list[list[Row]]:
    """The runtime calls for ``rows``: greedy and sampled rows apart, short prompts together."""
    calls = []
    for greedy in (True, False):
        group = sorted((r for r in rows if r.settings.greedy == greedy), key=lambda r: len(r.prompt))
        calls += [group[i : i + max_rows] for i in range(0, len(group), max_rows)]
    return calls


GenerateFn = Callable[[list[str], list[SamplingSettings]], list[str]]


def generate_batch(items: Sequence[GenerationItem], generate: GenerateFn, max_rows: int,
                   on_call: Callable[[int], None] = lambda rows: None) -> list[list[str]]:
    """One list of ``item.n`` continuations per item, in input order."""
    out: list[list[str]] = [[""] * item.n for item in items]
    for call in plan(expand(items), max_rows):
        on_call(len(call))
        texts = generate([r.prompt for r in call], [r.settings for r in call])
        for row, text in zip(call, texts, strict=True):
            out[row.item][row.index] = text
    return out


def decorator(max_batch_size: int, max_latency_ms: int) -> dict:
    """``@bentoml.api`` arguments for a model method: adaptive batching, or none at all when
    ``max_batch_size`` is 1 (BentoML refuses a batchable API below 2). The method takes and
    returns a list either way; unbatched, each request is its own model call."""
    if max_batch_size <= 1:
        return {}
    return {"batchable": True, "max_batch_size": max_batch_size, "max_latency_ms": max_latency_ms}


class Coalesce:
    """``await coalesce(texts)``: at most ``depth`` calls of ``call`` at a time, each carrying every list that
    arrived while the previous ones ran, up to ``max_items`` items (a longer list goes alone); no wait
    when idle. Under load this turns many small calls to the scorer service into a few larger ones:
    the scorer's process spent most of its time on each HTTP request, not on the model (docs/SERVING.md).

    A caller that goes away (cancelled) leaves: its list is dropped if it was not sent yet, and the
    call in flight is cancelled when nobody is left waiting for it."""

    def __init__(self, call: Callable[[list], Awaitable[list]], max_items: int | None = None, depth: int = 1):
        self.call, self.max_items, self.depth = call, max_items, depth
        self.pending: list[tuple[list, asyncio.Future]] = []
        self.running = 0  # calls under way (drain loops), at most ``depth``
        self.inflight: list[tuple[asyncio.Future, list[tuple[list, asyncio.Future]]]] = []

    async def __call__(self, items: list) -> list:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((items, future))
        if self.running < self.depth:
            self.running += 1
            asyncio.ensure_future(self._drain())
        try:
            return await future
        except asyncio.CancelledError:
            for call, taken in self.inflight:
                if all(f.done() for _, f in taken):
                    call.cancel()  # nobody waits for this call any more
            raise

    def _take(self) -> list[tuple[list, asyncio.Future]]:
        live = [p for p in self.pending if not p[1].done()]  # callers gone before their call: dropped
        taken, count = [], 0
        for items, future in live:
            if taken and self.max_items is not None and count + len(items) > self.max_items:
                break
            taken.append((items, future))
            count += len(items)
        self.pending = live[len(taken):]
        return taken

    async def _drain(self) -> None:
        try:
            while self.pending:
                taken = self._take()
                if not taken:
                    continue
                call = asyncio.ensure_future(self.call([x for items, _ in taken for x in items]))
                self.inflight.append(entry := (call, taken))
                try:
                    results = await call
                except asyncio.CancelledError:
                    for _, future in taken:  # abandoned by all of its callers, or cancelled from elsewhere
                        if not future.done():
                            future.set_exception(RuntimeError("the scoring call was cancelled"))
                    if asyncio.current_task().cancelling():
                        raise  # the drain itself was cancelled (the loop is closing)
                    continue
                except Exception as err:
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(err)
                    continue
                finally:
                    self.inflight.remove(entry)
                start = 0
                for items, future in taken:
                    if not future.done():
                        future.set_result(results[start:start + len(items)])
                    start += len(items)
        finally:
            self.running -= 1

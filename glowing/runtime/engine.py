"""Iteration-level (continuous) batching for the generator: one loop owns the model, rows join and
leave the running batch at every decoding step.

    engine = Engine(load_generator("artifacts/onnx/generator"), max_rows=64, max_step_tokens=2048)
    engine.start()                                    # the loop, in its own thread
    request = engine.submit("This movie", [SamplingSettings(max_new_tokens=48, seed=1)] * 4, sink=print)
    request.cancel()                                  # its rows leave at the next step

Every step (``Engine.step``), in this order:

1. rows whose request was cancelled leave the batch and the queue;
2. one decoding step for every running row; each row's new token goes to its request's sink;
   rows that ended (end of text, their ``max_new_tokens``) leave;
3. waiting rows are admitted, first come first served, up to ``max_rows`` running rows and a
   prefill budget of ``max_step_tokens`` padded prompt positions (the head of the queue is always
   admitted when nothing runs, so a long prompt cannot starve): their prompts are prefilled in
   one call, their first token sampled and sent, and their KV cache merged into the running batch.

A running batch is TGI's non-flash ``CausalLMBatch``: left padding, one attention mask and one KV
cache for its rows, position ids counted per row from its first real token. Merging pads the
narrower cache on the left. A row that ends leaves its request at once but keeps its slot in the
arrays, fed padding, until ``COMPACT_SHARE`` of its cohort has ended (cutting rows out copies the
whole cache): then the live rows are copied out and the columns every one of them masks are cut, so
a batch is never wider than its longest row's history by more than its ended rows' (``max_rows``
counts live rows; the arrays may hold up to a third more). Because every row of a batch pays for
its whole width at every step (attention, and the cache the model copies), newcomers join a batch
only when their widths are close enough that the padding costs less than a model call, else they run as a cohort
of their own (at most ``MAX_COHORTS``, one model call each per step; see ``_place``). An idle engine admits a new row
at once: there is no batching wait.

Each row samples with its own settings and its own random generator seeded from its seed (the
sampler of ``glowing.runtime.sampling``): a seeded row draws the same tokens whether it ran alone,
joined a running batch half-way or had partners cancelled around it, as far as the model's logits
do not depend on the batch's shape (tests/test_engine.py checks it token for token).

A model call that raises fails the rows that were in that call (their requests get an ``error``
finish) and the loop goes on. No HTTP and no BentoML here; ``AsyncEngine`` bridges to asyncio.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence

import numpy as np

from glowing.runtime.generator import Generator, left_pad
from glowing.runtime.sampling import SamplingSettings, make_rng, next_tokens

log = logging.getLogger("glowing.runtime")

STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"
MAX_COHORTS = 4  # running batches at most, each one model call per step
WAITING_SERVED_RATIO = 1.2  # as TGI's waiting_served_ratio (see _admit)
# What a model call costs beyond its positions, in positions (rows x width) of decoding: cohorts merge
# when the padding a merge adds is cheaper than the call it saves. Chosen by racing values under 16 and
# 32 closed-loop clients (`python -m loadtests.engine_inprocess --call-positions ...`, docs/SERVING.md):
# with the export's fused decoding graph a call is cheap and attention over a wide cohort is not
# (256 beat 512 by 4-7% in four races; 128 tied with 256).
CALL_POSITIONS = 256
# Rows that end stay in their cohort's arrays, fed padding and ignored, until they are this share of
# it: cutting them out copies the whole KV cache, which costs as much as many steps of a dead row
# (a row finishing every step or two of a 64-row batch made the copies a tenth of the engine's time).
COMPACT_SHARE = 0.25


class QueueFull(RuntimeError):
    """The engine's waiting queue cannot take the rows of a new request: retry later."""


@dataclass(frozen=True)
class RowUpdate:
    """What one step did to one row of a request: a new token, and/or the reason it finished."""

    index: int  # the row's index within its request
    token: int | None  # the new token id; None when the row finished without one (end of text)
    finish: str | None = None  # None (still running), stop, length, cancelled or error
    tokens: tuple[int, ...] | None = None  # with the finish of a request that does not stream: all its tokens


class EngineObserver:
    """Hooks for metrics; every method is called from the engine's thread and must be cheap."""

    def admitted(self, queue_seconds: float, prompt_tokens: int) -> None: ...

    def token(self, first: bool, seconds: float) -> None: ...  # time to first token, or since the row's last

    def finished(self, reason: str, seconds: float, tokens: int) -> None: ...  # seconds since submit

    def step(self, running: int, waiting: int) -> None: ...


@dataclass(eq=False)
class Request:
    """The rows of one submission. ``sink(updates)`` receives, once per step in which any of its
    rows changed, that step's ``RowUpdate`` list (from the engine's thread unless a ``deliver``
    hook moves it)."""

    id: int
    n_rows: int
    sink: Callable[[list[RowUpdate]], None]
    stream: bool = True  # False: no update per token, each row's tokens come with its finish
    submitted: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    error: BaseException | None = None  # set when a model call failed its rows

    def cancel(self) -> None:
        """Stop this request: its rows leave the engine at the next step (a flag: thread-safe)."""
        self.cancelled = True


@dataclass(eq=False)
class _Row:
    request: Request
    index: int
    prompt: list[int]
    settings: SamplingSettings
    max_new: int
    rng: np.random.Generator
    tokens: list[int] = field(default_factory=list)
    last: float = 0.0  # when its last token was made


@dataclass(eq=False)
class _Batch:
    """The running rows and their shared model state (row order = array order). A row that ended is
    None until the cohort is compacted (``COMPACT_SHARE``)."""

    rows: list[_Row | None]
    past: Any  # the backend's KV cache, ``width`` positions
    mask: np.ndarray  # (rows, width) int64, left padded
    lengths: np.ndarray  # (rows,) real tokens seen so far = the position of the next token
    next_ids: np.ndarray  # (rows,) the token each row feeds next


class Engine:
    def __init__(self, generator: Generator, *, max_rows: int = 64, max_step_tokens: int = 4096,
                 max_waiting: int = 1024, max_waiting_steps: int = 0, observer: EngineObserver | None = None):
        for name, value in (("max_rows", max_rows), ("max_step_tokens", max_step_tokens),
                            ("max_waiting", max_waiting), ("max_waiting_steps", max_waiting_steps + 1)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Engine {name}: must be an int >= 1 (max_waiting_steps: >= 0), got {value!r}")
        self.generator = generator
        self._lm = generator.lm
        self._pad = generator.codec.pad_id
        self.max_rows, self.max_step_tokens, self.max_waiting = max_rows, max_step_tokens, max_waiting
        self.max_waiting_steps = max_waiting_steps
        self._waited = 0  # decoding steps the head of the queue has waited while rows ran
        self.observer = observer or EngineObserver()
        self.deliver: Callable[[list[tuple[Request, list[RowUpdate]]]], None] = _deliver
        self._waiting: deque[_Row] = deque()
        self._cohorts: list[_Batch] = []  # running rows, in batches of similar width (see _place)
        self._lock = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # decoding and prefill calls so far (tests, benchmarks)
        self._reported: tuple[int, int] | None = None  # (running, waiting) last given to observer.step

    # ---- the outside: any thread ----------------------------------------------------------------

    @property
    def running(self) -> int:
        return sum(len(b.rows) - b.rows.count(None) for b in list(self._cohorts))

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def settings(self) -> dict[str, int]:
        return {"max_rows": self.max_rows, "max_step_tokens": self.max_step_tokens, "max_waiting": self.max_waiting,
                "max_waiting_steps": self.max_waiting_steps}

    def submit(self, prompt: str, rows: Sequence[SamplingSettings],
               sink: Callable[[list[RowUpdate]], None], stream: bool = True) -> Request:
        """Queue ``len(rows)`` continuations of ``prompt``, row ``i`` sampled with ``rows[i]``.
        ``stream`` False: the sink hears of a row only when it ends, with all its tokens (no
        per-token wake-ups for a consumer that waits for whole rows anyway). Raises ``QueueFull``
        (nothing queued) when the waiting rows would exceed ``max_waiting``."""
        if not rows:
            raise ValueError("submit: no rows")
        prompts, max_new = self.generator.encode([prompt] * len(rows), list(rows))
        request = Request(next(self._ids), len(rows), sink, stream)
        new = [_Row(request, i, ids, s, m, make_rng(s.seed)) for i, (ids, s, m) in
               enumerate(zip(prompts, rows, max_new))]
        with self._lock:
            if len(self._waiting) + len(new) > self.max_waiting:
                raise QueueFull(f"the generator's queue is full ({len(self._waiting)} rows waiting, limit "
                                f"{self.max_waiting}); retry later")
            self._waiting.extend(new)
            self._lock.notify()
        return request

    def start(self) -> None:
        """Run the loop in a daemon thread until ``stop()``."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="glowing-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def run_until_idle(self) -> None:
        """Step until no row runs or waits (in the caller's thread: tests, benchmarks)."""
        while self.step():
            pass

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._cohorts and not self._waiting:
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as err:  # a bug here must not kill the only thread that serves generation
                log.exception("engine step failed; its running rows fail, the engine goes on")
                out: dict[Request, list[RowUpdate]] = {}
                self._fail([r for c in self._cohorts for r in c.rows if r is not None], err, out)
                self._cohorts = []
                self.deliver(list(out.items()))

    # ---- one iteration: the engine's thread only ----------------------------------------------------

    def step(self) -> bool:
        """One iteration; False when there was nothing to do."""
        out: dict[Request, list[RowUpdate]] = {}
        self._drop_cancelled(out)
        did = False
        for cohort in list(self._cohorts):
            self._decode(cohort, out)
            did = True
        newcomers = self._admit()
        if newcomers:
            self._prefill(newcomers, out)
            did = True
        state = (self.running, self.waiting)
        if state != self._reported:  # the gauges are shared-memory writes in a multi-process server
            self.observer.step(*state)
            self._reported = state
        if out:
            self.deliver(list(out.items()))
        return did

    def _emit(self, out: dict, row: _Row, token: int | None, finish: str | None) -> None:
        if row.request.stream:
            out.setdefault(row.request, []).append(RowUpdate(row.index, token, finish))
        elif finish is not None:
            out.setdefault(row.request, []).append(RowUpdate(row.index, None, finish, tuple(row.tokens)))
        if finish is not None:
            self.observer.finished(finish, time.perf_counter() - row.request.submitted, len(row.tokens))

    def _drop_cancelled(self, out: dict) -> None:
        with self._lock:
            if any(r.request.cancelled for r in self._waiting):
                gone = [r for r in self._waiting if r.request.cancelled]
                self._waiting = deque(r for r in self._waiting if not r.request.cancelled)
            else:
                gone = []
        for row in gone:
            self._emit(out, row, None, CANCELLED)
        for cohort in list(self._cohorts):
            gone = [j for j, r in enumerate(cohort.rows) if r is not None and r.request.cancelled]
            for j in gone:
                self._emit(out, cohort.rows[j], None, CANCELLED)
            self._retire(cohort, gone)

    def _sample(self, rows: list[_Row], logits: np.ndarray, out: dict) -> list[int]:
        """Sample one token per row, send it, and return the indices of the rows that go on."""
        tokens = next_tokens(logits, [r.settings for r in rows], [r.rng for r in rows])
        now = time.perf_counter()
        going_on = []
        for j, (row, token) in enumerate(zip(rows, tokens.tolist())):
            first = not row.tokens
            self.observer.token(first, now - (row.request.submitted if first else row.last))
            row.last = now
            if token in self.generator.eos_ids:
                self._emit(out, row, None, STOP)
                continue
            row.tokens.append(token)
            if len(row.tokens) >= row.max_new:
                self._emit(out, row, token, LENGTH)
            else:
                self._emit(out, row, token, None)
                going_on.append(j)
        return going_on

    def _fail(self, rows: list[_Row], err: BaseException, out: dict) -> None:
        log.error("a generator call failed for %d rows", len(rows), exc_info=err)
        for row in rows:
            row.request.error = err
            self._emit(out, row, None, ERROR)

    def _decode(self, b: _Batch, out: dict) -> None:
        mask = np.concatenate([b.mask, np.ones((len(b.rows), 1), dtype=np.int64)], axis=1)
        live = [j for j, r in enumerate(b.rows) if r is not None]
        try:
            # an ended row's positions may run past the context while it waits for compaction: clamped
            positions = np.minimum(b.lengths, self.generator.n_positions - 1)[:, None]
            logits, past = self._lm.forward(b.next_ids[:, None], mask, positions, b.past)
        except Exception as err:  # the rows of this call fail; the engine serves the next requests
            self._fail([b.rows[j] for j in live], err, out)
            self._cohorts.remove(b)
            return
        self.steps += 1
        b.past, b.mask, b.lengths = past, mask, b.lengths + 1
        if len(live) < len(b.rows):
            logits = logits[live]
        going_on = set(self._sample([b.rows[j] for j in live], logits, out))
        kept = self._retire(b, [j for i, j in enumerate(live) if i not in going_on])
        if kept is not None:
            kept.next_ids = np.asarray([self._pad if r is None else r.tokens[-1] for r in kept.rows], dtype=np.int64)

    def _admit(self) -> list[_Row]:
        with self._lock:
            running = self.running
            # TGI's rule: while rows run, newcomers wait (at most max_waiting_steps steps) until they are
            # as many as WAITING_SERVED_RATIO x the running rows, so that one prefill call takes several
            # of them (a prefill per arriving request costs a model call each). An idle engine waits for nothing.
            if running and self._waiting and len(self._waiting) < WAITING_SERVED_RATIO * running \
                    and self._waited < self.max_waiting_steps:
                self._waited += 1
                return []
            self._waited = 0
            room = self.max_rows - running
            chosen: list[_Row] = []
            width = 0
            while self._waiting and len(chosen) < room:
                row = self._waiting[0]
                wider = max(width, len(row.prompt))
                if (len(chosen) + 1) * wider > self.max_step_tokens and (chosen or self._cohorts):
                    break  # first come, first served: nobody overtakes the head of the queue
                chosen.append(self._waiting.popleft())
                width = wider
        now = time.perf_counter()
        for row in chosen:
            self.observer.admitted(now - row.request.submitted, len(row.prompt))
        return chosen

    def _prefill(self, rows: list[_Row], out: dict) -> None:
        for row in [r for r in rows if r.max_new <= 0]:  # nothing to generate: done before any call
            self._emit(out, row, None, LENGTH)
        rows = [r for r in rows if r.max_new > 0]
        if not rows:
            return
        input_ids, mask = left_pad([r.prompt for r in rows], self._pad)
        positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)  # as transformers does
        try:
            logits, past = self._lm.forward(input_ids, mask, positions, None)
        except Exception as err:  # only the newcomers fail; the running batch is untouched
            self._fail(rows, err, out)
            return
        self.steps += 1
        keep = self._sample(rows, logits, out)
        if not keep:
            return
        idx = np.asarray(keep, dtype=np.int64)
        lengths = mask.sum(axis=1)[idx]
        start = int(mask.shape[1] - lengths.max())  # columns every kept row masks
        new = _Batch([rows[j] for j in keep], self._lm.select(past, idx, start), mask[idx, start:], lengths,
                     np.asarray([rows[j].tokens[-1] for j in keep], dtype=np.int64))
        self._place(new)

    def _place(self, new: _Batch) -> None:
        """Put newcomers among the running cohorts. Rows in one cohort share its width (the longest
        history in it), and pay for all of it at every step (attention, and the KV cache the model
        copies); every cohort costs a model call per step. Two cohorts merge when the padding the
        merge adds (the narrower one's rows x the width gap) costs less than a model call
        (``CALL_POSITIONS``), and beyond ``MAX_COHORTS`` the cheapest pair merges regardless."""
        self._cohorts.append(new)
        while len(self._cohorts) > 1:
            cohorts = sorted(self._cohorts, key=lambda c: c.mask.shape[1])
            padding, a, b = min(((len(x.rows) * (y.mask.shape[1] - x.mask.shape[1]), x, y)
                                 for x, y in zip(cohorts, cohorts[1:])), key=lambda t: t[0])
            if padding > CALL_POSITIONS and len(self._cohorts) <= MAX_COHORTS:
                return
            self._cohorts = [c for c in self._cohorts if c is not a and c is not b] + [self._merge(b, a)]

    def _merge(self, a: _Batch, b: _Batch) -> _Batch:
        width = max(a.mask.shape[1], b.mask.shape[1])
        pads = [width - a.mask.shape[1], width - b.mask.shape[1]]
        mask = np.concatenate([np.pad(a.mask, ((0, 0), (pads[0], 0))), np.pad(b.mask, ((0, 0), (pads[1], 0)))])
        return _Batch(a.rows + b.rows, self._lm.concat([a.past, b.past], pads), mask,
                      np.concatenate([a.lengths, b.lengths]), np.concatenate([a.next_ids, b.next_ids]))

    def _retire(self, b: _Batch, gone: list[int]) -> _Batch | None:
        """Rows ``gone`` of cohort ``b`` have ended: they become None, and once the ended rows are
        ``COMPACT_SHARE`` of the cohort, the live ones are copied out and the columns they all mask
        cut. Returns the cohort that stays (None when no row lives)."""
        for j in gone:
            b.rows[j] = None
        dead = b.rows.count(None)
        if dead == 0 or (dead < COMPACT_SHARE * len(b.rows) and b.mask.shape[1] < self.generator.n_positions):
            return b
        at = self._cohorts.index(b)
        keep = [j for j, r in enumerate(b.rows) if r is not None]
        if not keep:
            del self._cohorts[at]
            return None
        idx = np.asarray(keep, dtype=np.int64)
        lengths = b.lengths[idx]
        start = int(b.mask.shape[1] - lengths.max())
        self._cohorts[at] = _Batch([b.rows[j] for j in keep], self._lm.select(b.past, idx, start),
                                   b.mask[idx, start:], lengths, b.next_ids[idx])
        return self._cohorts[at]


def _deliver(pairs: list[tuple[Request, list[RowUpdate]]]) -> None:
    for request, updates in pairs:
        try:
            request.sink(updates)
        except Exception:
            log.exception("a request's sink failed; the request is cancelled")
            request.cancel()


class AsyncEngine:
    """The engine from asyncio: ``async for updates in engine.generate(prompt, rows)``.

    Updates cross from the engine's thread to the event loop once per step (one
    ``call_soon_threadsafe`` for every request that changed); a consumer slower than the engine gets
    the steps it missed together, in order, so that its per-update work shrinks as load grows. Leaving the ``async for`` early
    (the consumer was cancelled, the client went away, a timeout) cancels the request's rows."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop | None = None):
        self.engine = engine
        self.loop = loop or asyncio.get_running_loop()
        engine.deliver = lambda pairs: self.loop.call_soon_threadsafe(_deliver, pairs)

    async def generate(self, prompt: str, rows: Sequence[SamplingSettings],
                       stream: bool = True) -> AsyncIterator[list[RowUpdate]]:
        queue: asyncio.Queue[list[RowUpdate]] = asyncio.Queue()
        request = self.engine.submit(prompt, rows, queue.put_nowait, stream)
        open_rows = len(rows)
        try:
            while open_rows:
                updates = await queue.get()
                while not queue.empty():  # a consumer that fell behind takes every step waiting, in order
                    updates = updates + queue.get_nowait()
                open_rows -= sum(u.finish is not None for u in updates)
                if request.error is not None and any(u.finish == ERROR for u in updates):
                    raise GenerationError(f"the generator failed: {type(request.error).__name__}") \
                        from request.error
                yield updates
        finally:
            if open_rows:
                request.cancel()


class GenerationError(RuntimeError):
    """A model call failed the rows of this request (the engine itself goes on serving)."""


class IncrementalDetokenizer:
    """Text deltas of one row as its tokens arrive (vLLM's offsets): a delta is held back while it
    ends in an incomplete UTF-8 sequence, so that the deltas add up to ``decode(all tokens)``."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # ids before this are in text already and need no context
        self._read = 0  # ids before this have been turned into text
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int | None) -> str:
        if token is not None:
            self.ids.append(token)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """The rest of the text (whatever was held back), so that ``self.text`` is the full decode."""
        full = self._decode(self.ids)
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text = full
        return delta

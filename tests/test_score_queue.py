"""ScoreQueue on the exported tiny classifier: order, merging, zero wait, cancellation, failures."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from glowing.runtime import QueueClosed, ScoreQueue, load_scorer

TEXTS = ["Great film.", "Awful, boring, a waste of time.", "It was fine.<br /><br />Not more.",
         " ".join(["The plot was moving and the cast was wonderful."] * 10), "Dull.", "A delight from start to end."]


class Gate:
    """Wraps the model: can hold calls until opened, fails the calls numbered in ``fail``, and
    records when each call started and how many rows it had."""

    def __init__(self, forward):
        self.forward = forward
        self.opened = threading.Event()
        self.opened.set()
        self.entered = threading.Event()
        self.fail: set[int] = set()
        self.calls: list[tuple[float, int]] = []

    def __call__(self, input_ids, mask):
        number = len(self.calls) + 1
        self.calls.append((time.perf_counter(), len(input_ids)))
        self.entered.set()
        assert self.opened.wait(30), "the test never opened the gate"
        if number in self.fail:
            raise RuntimeError(f"model call {number} failed")
        return self.forward(input_ids, mask)

    def hold(self):
        self.opened.clear()
        self.entered.clear()

    async def busy(self):
        """Returns once a held call has reached the model."""
        assert await asyncio.to_thread(self.entered.wait, 30)


@pytest.fixture(scope="module")
def scorer(exported):
    return load_scorer(exported, "onnx", "cpu", "fp32")


@pytest.fixture(scope="module")
def alone(scorer):
    return {t: scorer.score([t])[0] for t in TEXTS}


@pytest.fixture
def gated(scorer, monkeypatch):
    gate = Gate(scorer._forward)
    monkeypatch.setattr(scorer, "_forward", gate)
    return gate


def _queue(scorer, seen: list, max_texts: int = 64) -> ScoreQueue:
    return ScoreQueue(scorer, max_texts=max_texts, on_call=lambda rows, padded, real: seen.append(rows))


def test_scores_come_back_in_each_requests_order(scorer, alone):
    async def main():
        queue = _queue(scorer, [])
        requests = [TEXTS, TEXTS[::-1], TEXTS[2:4], [TEXTS[0]] * 3]
        results = await asyncio.gather(*(queue.score(r) for r in requests))
        assert await queue.score([]) == []
        await queue.aclose()
        return requests, results

    requests, results = asyncio.run(main())
    for texts, scores in zip(requests, results):
        assert scores == pytest.approx([alone[t] for t in texts], abs=1e-6)


def test_requests_queued_while_the_model_is_busy_share_its_next_calls(scorer, gated, alone):
    seen = []

    async def main():
        queue = _queue(scorer, seen)
        gated.hold()
        first = asyncio.create_task(queue.score(["Dull."]))
        await gated.busy()
        waiting = [asyncio.create_task(queue.score(["Great film.", "Great film."])) for _ in range(5)]
        await asyncio.sleep(0)
        assert queue.pending() == 10
        gated.opened.set()
        results = await asyncio.gather(first, *waiting)
        await queue.aclose()
        return results

    results = asyncio.run(main())
    assert seen == [1, 10]  # the lone first request, then the five queued ones in one model call
    assert results[0] == pytest.approx([alone["Dull."]], abs=1e-6)
    assert all(r == pytest.approx([alone["Great film."]] * 2, abs=1e-6) for r in results[1:])


def test_a_take_holds_at_most_max_texts_and_a_bigger_request_goes_alone(scorer, gated):
    seen = []

    async def main():
        queue = _queue(scorer, seen, max_texts=4)
        gated.hold()
        first = asyncio.create_task(queue.score(["Dull."]))
        await gated.busy()
        tasks = [asyncio.create_task(queue.score(t)) for t in (["Ok."] * 3, ["Ok."] * 2, ["Ok."] * 6)]
        await asyncio.sleep(0)
        gated.opened.set()
        await asyncio.gather(first, *tasks)
        await queue.aclose()

    asyncio.run(main())
    assert seen == [1, 3, 2, 6]  # 3 + 2 > max_texts: two takes; the 6-text request alone


def test_a_lone_request_goes_straight_to_the_model(scorer, gated):
    seen = []

    async def main():
        queue = _queue(scorer, seen)
        await asyncio.gather(*(queue.score([t]) for t in TEXTS * 4))  # a burst first: nothing learns to wait
        started = time.perf_counter()
        await queue.score(["Great film."])
        await queue.aclose()
        return started

    started = asyncio.run(main())
    entered, rows = gated.calls[-1]
    assert rows == 1 and seen[-1] == 1
    assert entered - started < 0.2  # no batching window: it reaches the model at once


def test_a_request_cancelled_while_queued_is_never_computed(scorer, gated, alone):
    seen = []

    async def main():
        queue = _queue(scorer, seen)
        gated.hold()
        first = asyncio.create_task(queue.score(["Dull."]))
        await gated.busy()
        doomed = asyncio.create_task(queue.score(["Great film.", "Awful, boring, a waste of time."]))
        timed_out = asyncio.create_task(asyncio.wait_for(queue.score(["It was fine."]), timeout=0.01))
        await asyncio.sleep(0.05)
        doomed.cancel()
        await asyncio.sleep(0)
        gated.opened.set()
        after = await queue.score(["Dull."])
        assert doomed.cancelled()
        with pytest.raises(asyncio.TimeoutError):
            await timed_out
        await first
        await queue.aclose()
        return after

    assert asyncio.run(main()) == pytest.approx([alone["Dull."]], abs=1e-6)
    assert sum(seen) == 2  # the first request and the last one; the cancelled three texts never ran


def test_a_failing_model_call_fails_only_its_take(scorer, gated, alone):
    async def main():
        queue = _queue(scorer, [])
        gated.hold()
        gated.fail = {2}
        first = asyncio.create_task(queue.score(["Dull."]))
        await gated.busy()
        failing = [asyncio.create_task(queue.score(["Great film."])) for _ in range(2)]
        await asyncio.sleep(0)
        gated.opened.set()
        outcomes = await asyncio.gather(first, *failing, return_exceptions=True)
        after = await queue.score(["Great film."])
        await queue.aclose()
        return outcomes, after

    outcomes, after = asyncio.run(main())
    assert outcomes[0] == pytest.approx([alone["Dull."]], abs=1e-6)
    assert all(isinstance(o, RuntimeError) and "model call 2 failed" in str(o) for o in outcomes[1:])
    assert after == pytest.approx([alone["Great film."]], abs=1e-6)


def test_close_fails_what_is_queued_and_refuses_more(scorer, gated):
    async def main():
        queue = _queue(scorer, [])
        gated.hold()
        running = asyncio.create_task(queue.score(["Dull."]))
        await gated.busy()
        queued = asyncio.create_task(queue.score(["Great film."]))
        await asyncio.sleep(0)
        await queue.aclose()
        gated.opened.set()
        outcomes = await asyncio.gather(running, queued, return_exceptions=True)
        with pytest.raises(QueueClosed):
            await queue.score(["Late."])
        return outcomes

    outcomes = asyncio.run(main())
    assert all(isinstance(o, QueueClosed) for o in outcomes)
    with pytest.raises(ValueError, match="max_texts"):
        ScoreQueue(None, max_texts=0)

"""The iteration-level engine on the exported tiny generator: exact replay whatever the batch, row
cap and prefill budget, cancellation, failures, asyncio streaming and text deltas."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from glowing.runtime import SamplingSettings, load_generator
from glowing.runtime.engine import (CANCELLED, ERROR, LENGTH, STOP, AsyncEngine, Engine, EngineObserver,
                                    GenerationError, IncrementalDetokenizer, QueueFull)

LONG_PROMPT = " ".join(["The plot was moving and the cast was wonderful"] * 3)
PROMPTS = ["This movie", "I went to see this film with my", "", LONG_PROMPT, "Great"]


@pytest.fixture(scope="module", params=["onnx", pytest.param("torch", marks=pytest.mark.slow)])  # torch: the slow lane
def generator(request, exported):
    kind = exported / "onnx" / "generator" if request.param == "onnx" else exported / "generator"
    return load_generator(kind, request.param, "cpu")


def sampled(seed: int, tokens: int = 24) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=tokens, temperature=1.0, top_k=50, top_p=0.95, seed=seed)


class Recorder:
    """A sink per request: the tokens and the finish of each row."""

    def __init__(self, n: int):
        self.tokens = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n

    def __call__(self, updates):
        for u in updates:
            if u.token is not None:
                self.tokens[u.index].append(u.token)
            if u.finish is not None:
                assert self.finish[u.index] is None, "a row finished twice"
                self.finish[u.index] = u.finish


def alone(generator, prompt: str, settings: SamplingSettings) -> list[int]:
    return generator.generate_ids([prompt], settings)[0]


def test_rows_submitted_together_replay_the_request_level_loop(generator):
    engine = Engine(generator, max_rows=8)
    settings = [sampled(i, tokens=8 + 6 * i) for i in range(len(PROMPTS))]
    recorders = [Recorder(1) for _ in PROMPTS]
    for prompt, s, rec in zip(PROMPTS, settings, recorders):
        engine.submit(prompt, [s], rec)
    engine.run_until_idle()
    for prompt, s, rec in zip(PROMPTS, settings, recorders):
        assert rec.tokens[0] == alone(generator, prompt, s)
        assert rec.finish[0] in (STOP, LENGTH)
    assert engine.running == 0 and engine.waiting == 0


def test_a_row_joining_a_running_batch_half_way_is_identical(generator):
    engine = Engine(generator, max_rows=8)
    early = Recorder(2)
    engine.submit(PROMPTS[1], [sampled(1, 40), sampled(2, 40)], early)
    for _ in range(7):  # the first rows are 7 tokens in, their cache 7 columns wider than their prompt
        engine.step()
    late_short, late_long = Recorder(1), Recorder(1)
    engine.submit("Great", [sampled(3, 30)], late_short)  # narrower than the running batch
    engine.submit(LONG_PROMPT, [sampled(4, 30)], late_long)  # wider: the running rows are padded
    engine.run_until_idle()
    assert early.tokens == [alone(generator, PROMPTS[1], sampled(i, 40)) for i in (1, 2)]
    assert late_short.tokens[0] == alone(generator, "Great", sampled(3, 30))
    assert late_long.tokens[0] == alone(generator, LONG_PROMPT, sampled(4, 30))


def test_cancelled_partners_leave_at_the_next_step_and_change_nothing(generator):
    engine = Engine(generator, max_rows=8)
    kept, dropped = Recorder(1), Recorder(3)
    doomed = engine.submit(LONG_PROMPT, [sampled(10, 60), sampled(11, 60), sampled(12, 60)], dropped)
    engine.submit(PROMPTS[0], [sampled(5, 40)], kept)
    for _ in range(4):
        engine.step()
    assert engine.running == 4
    doomed.cancel()
    engine.step()
    assert engine.running == 1 and dropped.finish == [CANCELLED] * 3
    engine.run_until_idle()
    assert kept.tokens[0] == alone(generator, PROMPTS[0], sampled(5, 40))
    # cancelled rows do no more work: they got at most the tokens of the 4 steps before the cancel
    assert all(len(t) <= 5 for t in dropped.tokens)


def test_row_cap_and_prefill_budget_hold_and_everyone_gets_served(generator):
    seen = []

    class Watch(EngineObserver):
        def step(self, running, waiting):
            seen.append((running, waiting))

    engine = Engine(generator, max_rows=3, max_step_tokens=12, observer=Watch())
    recorders = [Recorder(1) for _ in range(7)]
    for i, rec in enumerate(recorders):
        engine.submit(PROMPTS[i % len(PROMPTS)], [sampled(20 + i, 10)], rec)
    engine.run_until_idle()
    assert max(r for r, _ in seen) <= 3
    assert all(rec.finish[0] in (STOP, LENGTH) for rec in recorders)
    for i, rec in enumerate(recorders):
        assert rec.tokens[0] == alone(generator, PROMPTS[i % len(PROMPTS)], sampled(20 + i, 10))


def test_a_request_that_does_not_stream_hears_only_of_finished_rows(generator):
    engine = Engine(generator)
    calls = []
    engine.submit(PROMPTS[1], [sampled(1, 20), sampled(2, 30)], calls.append, stream=False)
    engine.run_until_idle()
    updates = [u for call in calls for u in call]
    assert all(u.finish is not None and u.token is None for u in updates) and len(updates) == 2
    assert [list(u.tokens) for u in sorted(updates, key=lambda u: u.index)] == \
        [alone(generator, PROMPTS[1], sampled(i, n)) for i, n in ((1, 20), (2, 30))]


def test_zero_new_tokens_finish_without_a_model_call(generator):
    engine = Engine(generator)
    rec = Recorder(2)
    engine.submit("This movie", [sampled(1, 0), sampled(2, 3)], rec)
    engine.run_until_idle()
    assert rec.tokens[0] == [] and rec.finish[0] == LENGTH and len(rec.tokens[1]) <= 3


def test_a_full_queue_refuses_the_whole_request(generator):
    engine = Engine(generator, max_waiting=4)
    engine.submit("a", [sampled(1)] * 3, Recorder(3))
    with pytest.raises(QueueFull, match="queue is full"):
        engine.submit("b", [sampled(2)] * 2, Recorder(2))
    assert engine.waiting == 3
    engine.submit("c", [sampled(3)], Recorder(1))
    assert engine.waiting == 4


class FailingLM:
    """The real model, except that a forward whose batch holds a row with ``poison`` raises."""

    def __init__(self, lm, poison: int):
        self.lm, self.poison, self.fail_next_decode = lm, poison, False

    def forward(self, input_ids, attention_mask, position_ids, past):
        if past is None and (input_ids == self.poison).any():
            raise RuntimeError("simulated model failure")
        if past is not None and self.fail_next_decode:
            self.fail_next_decode = False
            raise RuntimeError("simulated decode failure")
        return self.lm.forward(input_ids, attention_mask, position_ids, past)

    def __getattr__(self, name):
        return getattr(self.lm, name)


def test_a_failing_model_call_fails_only_its_rows(generator, monkeypatch):
    poison = generator.encode(["zzzz"], [sampled(0)])[0][0][-1]
    engine = Engine(generator)
    engine._lm = FailingLM(generator.lm, poison)
    good, bad = Recorder(1), Recorder(2)
    engine.submit(PROMPTS[1], [sampled(7, 20)], good)
    engine.step()  # the good row runs
    engine.submit("zzzz", [sampled(8)] * 2, bad)  # its prefill fails
    engine.run_until_idle()
    assert bad.finish == [ERROR, ERROR]
    assert good.tokens[0] == alone(generator, PROMPTS[1], sampled(7, 20))
    # a failed decoding step fails the running rows; the next request is served
    victim, after = Recorder(1), Recorder(1)
    engine.submit("This movie", [sampled(9, 20)], victim)
    engine.step()
    engine._lm.fail_next_decode = True
    engine.step()
    assert victim.finish == [ERROR] and engine.running == 0
    engine.submit("This movie", [sampled(9, 20)], after)
    engine.run_until_idle()
    assert after.tokens[0] == alone(generator, "This movie", sampled(9, 20))


def test_async_streaming_threaded_engine_and_cancellation(generator):
    engine = Engine(generator, max_rows=16)
    engine.start()
    try:
        async def main():
            bridge = AsyncEngine(engine)
            rows = [sampled(30, 30), sampled(31, 30)]
            got = [[], []]
            async for updates in bridge.generate("This movie", rows):
                for u in updates:
                    if u.token is not None:
                        got[u.index].append(u.token)
            assert got == [alone(generator, "This movie", s) for s in rows]

            async def abandoned():
                async for _ in bridge.generate(LONG_PROMPT, [sampled(40, 60)] * 4):
                    await asyncio.sleep(10)  # a slow consumer that gets cancelled

            task = asyncio.create_task(abandoned())
            await asyncio.sleep(0.3)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for _ in range(100):
                if engine.running == 0 and engine.waiting == 0:
                    break
                await asyncio.sleep(0.02)
            assert engine.running == 0 and engine.waiting == 0

        asyncio.run(main())
    finally:
        engine.stop()


def test_async_errors_raise_generation_error(generator):
    poison = generator.encode(["zzzz"], [sampled(0)])[0][0][-1]
    engine = Engine(generator)
    engine._lm = FailingLM(generator.lm, poison)
    engine.start()
    try:
        async def main():
            bridge = AsyncEngine(engine)
            with pytest.raises(GenerationError, match="generator failed"):
                async for _ in bridge.generate("zzzz", [sampled(1)]):
                    pass
        asyncio.run(main())
    finally:
        engine.stop()


def test_an_unexpected_error_in_a_step_fails_the_running_rows_and_the_loop_goes_on(generator):
    engine = Engine(generator)
    original, broken = engine._admit, {"once": True}

    def admit():
        if engine.running and broken.pop("once", False):
            raise TypeError("a bug")
        return original()

    engine._admit = admit
    engine.start()
    try:
        failed, done = threading.Event(), threading.Event()
        victim = Recorder(1)
        engine.submit(PROMPTS[1], [sampled(1, 30)],
                      lambda ups: (victim(ups), failed.set() if victim.finish[0] else None))
        assert failed.wait(10) and victim.finish == [ERROR]
        after = Recorder(1)
        engine.submit("This movie", [sampled(2, 10)], lambda ups: (after(ups), done.set() if after.finish[0] else None))
        assert done.wait(10) and after.tokens[0] == alone(generator, "This movie", sampled(2, 10))
    finally:
        engine.stop()


def test_idle_engine_starts_a_row_at_once(generator):
    """No batching wait: the loop thread wakes on submit."""
    engine = Engine(generator)
    engine.start()
    try:
        first = threading.Event()
        engine.submit("This movie", [sampled(1, 4)], lambda updates: first.set())
        assert first.wait(5.0)
    finally:
        engine.stop()


def test_detokenizer_deltas_add_up_to_the_decoded_text(generator):
    tokenizer = generator.codec.tokenizer
    for seed in range(6):
        ids = alone(generator, "This movie", sampled(seed, 40))
        detok = IncrementalDetokenizer(tokenizer)
        text = "".join(detok.add(t) for t in ids) + detok.finish()
        assert text == tokenizer.decode(ids, skip_special_tokens=True) == detok.text
    # a multi-byte character split over byte-level tokens is held back until it is complete
    ids = tokenizer.encode("café ☃ done").ids
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.add(t) for t in ids]
    assert "\ufffd" not in "".join(deltas) and "".join(deltas) + detok.finish() == tokenizer.decode(ids)


def test_cheap_padding_merges_newcomers_into_the_running_cohort(generator):
    engine = Engine(generator, max_rows=16)  # CALL_POSITIONS: padding 1 row by a few positions is cheaper
    engine.submit(PROMPTS[1], [sampled(1, 30)], Recorder(1))
    for _ in range(3):
        engine.step()
    engine.submit("Great", [sampled(2, 30)], rec := Recorder(1))
    engine.step()
    assert len(engine._cohorts) == 1 and len(engine._cohorts[0].rows) == 2
    engine.run_until_idle()
    assert rec.tokens[0] == alone(generator, "Great", sampled(2, 30))


def test_a_busy_engine_gathers_newcomers_for_one_prefill_within_its_step_limit(generator):
    engine = Engine(generator, max_rows=16, max_waiting_steps=3)
    first = Recorder(4)
    engine.submit(PROMPTS[1], [sampled(i, 40) for i in range(4)], first)
    engine.step()
    late = Recorder(1)
    engine.submit("Great", [sampled(9, 20)], late)  # 1 waiting < 1.2 x 4 running: it may wait 3 steps
    waits = 0
    while engine.waiting:
        engine.step()
        waits += 1
    assert waits == 4 and engine.running == 5  # waited 3 steps, admitted at the 4th
    engine.submit("Great", [sampled(k, 5) for k in range(10, 16)], Recorder(6))  # 6 >= 1.2 x 5: at once
    engine.step()
    assert engine.waiting == 0
    engine.run_until_idle()
    assert late.tokens[0] == alone(generator, "Great", sampled(9, 20))


def test_invalid_engine_settings_name_the_setting(generator):
    with pytest.raises(ValueError, match="max_rows"):
        Engine(generator, max_rows=0)


def test_cache_width_stays_bounded_by_the_longest_history(generator):
    """Rows leaving cut the columns every remaining row masks: the cache never outgrows the context."""
    engine = Engine(generator, max_rows=4)
    engine.submit(LONG_PROMPT, [sampled(50, 5)], Recorder(1))  # wide and short-lived
    engine.submit("Great", [sampled(51, 30)], Recorder(1))
    widths = []
    while engine.step():
        widths += [(c.mask.shape[1], int(c.lengths.max())) for c in engine._cohorts]
    assert widths and all(w == longest for w, longest in widths)


def test_newcomers_of_a_very_different_width_run_as_their_own_cohort(generator, monkeypatch):
    """A short prompt arriving while long rows run starts a cohort of its own when padding it to the
    long rows' width costs more than a model call; at most MAX_COHORTS run, and every row still
    replays exactly."""
    from glowing.runtime import engine as engine_module
    from glowing.runtime.engine import MAX_COHORTS

    monkeypatch.setattr(engine_module, "CALL_POSITIONS", 4)  # the tiny model's widths are small
    engine = Engine(generator, max_rows=16)
    recorders = []
    engine.submit(LONG_PROMPT, [sampled(60, 40)], rec := Recorder(1))
    recorders.append((LONG_PROMPT, 60, rec))
    for _ in range(6):
        engine.step()
    engine.submit("Great", [sampled(61, 30)], rec := Recorder(1))
    recorders.append(("Great", 61, rec))
    engine.step()
    assert len(engine._cohorts) == 2 and sorted(len(c.rows) for c in engine._cohorts) == [1, 1]
    for i in range(6):  # more arrivals than cohorts: the closest in width merge
        engine.submit(PROMPTS[i % len(PROMPTS)], [sampled(70 + i, 20)], rec := Recorder(1))
        recorders.append((PROMPTS[i % len(PROMPTS)], 70 + i, rec))
        engine.step()
        engine.step()
        assert len(engine._cohorts) <= MAX_COHORTS
    engine.run_until_idle()
    for prompt, seed, rec in recorders:
        tokens = 40 if seed == 60 else 30 if seed == 61 else 20
        assert rec.tokens[0] == alone(generator, prompt, sampled(seed, tokens))


def test_ended_rows_stay_as_padding_until_a_quarter_of_the_cohort_has_ended(generator):
    """Cutting an ended row out copies the whole cache: the engine feeds it padding instead until
    COMPACT_SHARE of the cohort has ended, then compacts once; nobody's tokens change."""
    from glowing.runtime.engine import COMPACT_SHARE

    assert COMPACT_SHARE == 0.25
    engine = Engine(generator, max_rows=8)
    lengths = [3, 5, 30, 30, 30, 30, 30, 30]  # 8 rows: the first ends, then the second
    rec = Recorder(8)
    settings = [sampled(80 + i, n) for i, n in enumerate(lengths)]
    engine.submit("This movie", settings, rec)
    physical = []
    while engine.step():
        physical.append((engine.running, sum(len(c.rows) for c in engine._cohorts)))
    assert any(live < rows for live, rows in physical)  # an ended row kept its slot a while
    assert all(rows - live < 0.25 * rows or live == 0 for live, rows in physical)  # never a quarter dead
    for i, s in enumerate(settings):
        assert rec.tokens[i] == alone(generator, "This movie", s)


def test_an_ended_row_waiting_for_compaction_never_runs_past_the_context(generator):
    """An ended row's history keeps growing while it waits: the cohort is compacted when its width
    reaches the context, and the ended row's positions are clamped until then."""
    context = generator.n_positions
    engine = Engine(generator, max_rows=8)
    long_prompt = " ".join(["great"] * (context - 8))
    engine.submit(long_prompt, [sampled(90, 2)], Recorder(1))
    rec = Recorder(7)
    settings = [sampled(91 + i, 24) for i in range(7)]
    engine.submit("Great", settings, rec)  # same prefill: one cohort, 1 of 8 ends early (under a quarter)
    while engine.step():
        assert all(c.mask.shape[1] <= context for c in engine._cohorts)
    for i, s in enumerate(settings):
        assert rec.tokens[i] == alone(generator, "Great", s)

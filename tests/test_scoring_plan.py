"""Length-aware model calls: the planner's properties, and scores that ignore their batch partners."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from glowing.runtime import load_scorer, plan_calls
from glowing.runtime.scorer import ATTENTION_SPAN, CALL_OVERHEAD

LONG = " ".join(["The plot was moving and the cast was wonderful, though the ending dragged."] * 20)


def _cost(lengths, call):
    longest = max(lengths[i] for i in call)
    return CALL_OVERHEAD + len(call) * longest * (1 + longest / ATTENTION_SPAN)


def _random_lengths(rng: random.Random) -> list[int]:
    n = rng.choice([0, 1, 2, 5, 16, 64, 256])
    top = rng.choice([8, 64, 512])
    return [rng.randint(1, top) for _ in range(n)]


@pytest.mark.parametrize("seed", range(40))
def test_plan_takes_every_text_once_within_the_budget_sorted_by_length(seed):
    rng = random.Random(seed)
    lengths = _random_lengths(rng)
    max_rows, max_tokens = rng.choice([1, 4, 32]), rng.choice([64, 700, 8192])
    calls = plan_calls(lengths, max_rows, max_tokens)
    assert sorted(i for call in calls for i in call) == list(range(len(lengths)))
    for call in calls:
        assert 1 <= len(call) <= max_rows
        assert len(call) == 1 or len(call) * max(lengths[i] for i in call) <= max_tokens
    in_order = [lengths[i] for call in calls for i in call]
    assert in_order == sorted(in_order)  # calls are runs of the length-sorted texts


def test_a_text_longer_than_the_budget_goes_alone():
    calls = plan_calls([10, 600, 12, 11], max_rows=32, max_tokens=512)
    assert [1] in calls and len(calls) == 2
    assert plan_calls([600, 600, 600], max_rows=32, max_tokens=512) == [[0], [1], [2]]


def test_plan_is_the_cheapest_split_of_the_sorted_texts():
    """Brute force: every way of cutting the sorted run into calls, against the planner's choice."""
    rng = random.Random(3)
    for _ in range(30):
        lengths = [rng.choice([3, 5, 40, 41, 60, 300, 310, 512]) for _ in range(rng.randint(1, 8))]
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        best = float("inf")
        for cuts in itertools.product([False, True], repeat=len(order) - 1):
            calls, current = [], [order[0]]
            for cut, i in zip(cuts, order[1:]):
                if cut:
                    calls.append(current)
                    current = []
                current.append(i)
            calls.append(current)
            if all(len(c) <= 4 and (len(c) == 1 or len(c) * max(lengths[i] for i in c) <= 1024) for c in calls):
                best = min(best, sum(_cost(lengths, c) for c in calls))
        plan = plan_calls(lengths, 4, 1024)
        assert sum(_cost(lengths, c) for c in plan) == pytest.approx(best)


def test_padding_stays_small_and_short_texts_share_calls():
    rng = random.Random(0)
    lengths = [rng.randint(20, 512) for _ in range(256)]
    calls = plan_calls(lengths, 32, 8192)
    padded = sum(len(c) * max(lengths[i] for i in c) for c in calls)
    assert 1 - sum(lengths) / padded < 0.05
    assert len(calls) < len(lengths) / 2
    assert plan_calls([7] * 40, 32, 8192) == [list(range(32)), list(range(32, 40))]
    with pytest.raises(ValueError, match="max_tokens"):
        plan_calls([1], 4, 0)


# ---- on the exported tiny classifier -----------------------------------------------------------

@pytest.fixture(scope="module")
def texts(export_data_dir):
    import pyarrow.parquet as pq

    reviews = pq.read_table(export_data_dir / "imdb" / "test.parquet").column("text").to_pylist()
    rng = random.Random(5)
    return rng.sample(reviews, 40) + [LONG, "Great film.", "", "Awful.", LONG[:300]]


@pytest.mark.parametrize("batch_size,max_batch_tokens", [(32, 8192), (4, 100), (32, 1)])
def test_fp32_scores_equal_one_text_per_call_whatever_the_partners(exported, texts, batch_size, max_batch_tokens):
    scorer = load_scorer(exported, "onnx", "cpu", "fp32", batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    alone = np.array([scorer.score([t])[0] for t in texts])
    assert np.abs(np.array(scorer.score(texts)) - alone).max() < 1e-6
    # any grouping at all: arrival order, reversed, random calls
    ids = scorer.encode(texts)
    rng = random.Random(1)
    for calls in ([list(range(len(texts)))], [list(range(len(texts)))[::-1]],
                  [list(c) for c in np.array_split(rng.sample(range(len(texts)), len(texts)), 7)]):
        assert np.abs(np.array(scorer.probabilities(scorer.logits_from_ids(ids, calls))) - alone).max() < 1e-6


def test_on_call_reports_rows_padding_and_real_tokens(exported, texts):
    scorer = load_scorer(exported, "onnx", "cpu", "fp32")
    calls = []
    ids = scorer.encode(texts)
    scorer.logits_from_ids(ids, on_call=lambda *figures: calls.append(figures))
    plan = scorer.plan(ids)
    assert [c[0] for c in calls] == [len(c) for c in plan]
    assert [c[1] for c in calls] == [len(c) * max(len(ids[i]) for i in c) for c in plan]
    assert sum(c[2] for c in calls) == sum(map(len, ids))
    assert scorer.info()["max_batch_tokens"] == scorer.max_batch_tokens


@pytest.mark.parametrize("threads", [1, 2])
def test_int8_keeps_one_text_per_call(exported, texts, threads):
    scorer = load_scorer(exported, "onnx", "cpu", "int8", threads=threads)
    rows = []
    scorer.logits_from_ids(scorer.encode(texts), on_call=lambda n, padded, real: rows.append((n, padded == real)))
    assert rows == [(1, True)] * len(texts)


def test_bad_token_budget_is_named(exported):
    with pytest.raises(ValueError, match="max_batch_tokens"):
        load_scorer(exported, "onnx", "cpu", "fp32", max_batch_tokens=0)

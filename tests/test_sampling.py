"""The batched sampler gives every row exactly the token ``sample_row`` gives it alone."""

from __future__ import annotations

import numpy as np
import pytest

from glowing.runtime.sampling import SamplingSettings, make_rng, next_tokens, next_tokens_per_row, sample_row

VOCAB = 512


def _logits(rng: np.random.Generator, rows: int, kind: str) -> np.ndarray:
    if kind == "normal":
        return (rng.standard_normal((rows, VOCAB)) * 3).astype(np.float32)
    if kind == "peaked":  # a model sure of itself: one token far ahead
        x = rng.standard_normal((rows, VOCAB)).astype(np.float32)
        x[np.arange(rows), rng.integers(0, VOCAB, rows)] += 25
        return x
    if kind == "coarse":  # logits on a grid of 0.5: ties everywhere, at the top-k boundary too
        return (np.round(rng.standard_normal((rows, VOCAB)) * 4) / 2).astype(np.float32)
    raise ValueError(kind)


SETTINGS = [SamplingSettings(top_k=50, top_p=0.95), SamplingSettings(top_k=50, top_p=1.0),
            SamplingSettings(top_k=50, top_p=0.5, temperature=0.3), SamplingSettings(top_k=1),
            SamplingSettings(top_k=2, temperature=2.5), SamplingSettings(top_k=VOCAB - 1, top_p=0.9),
            SamplingSettings(top_k=VOCAB), SamplingSettings(top_k=0, top_p=0.8), SamplingSettings(temperature=0),
            SamplingSettings(top_k=7, top_p=0.99, temperature=1e-300), SamplingSettings(top_k=50, top_p=0.95,
                                                                                         temperature=1.7)]


@pytest.mark.parametrize("kind", ["normal", "peaked", "coarse"])
def test_batched_sampler_equals_sample_row_for_every_row(kind):
    data = np.random.default_rng(hash(kind) % 2**32)
    for step in range(30):
        rows = int(data.integers(1, 40))
        settings = [SETTINGS[int(i)] for i in data.integers(0, len(SETTINGS), rows)]
        if step % 3 == 0:  # a batch where every row shares its settings: the all-rows path
            settings = [SETTINGS[step % len(SETTINGS)]] * rows
        logits = _logits(data, rows, kind)
        seeds = data.integers(0, 2**31, rows)
        batched_rngs = [make_rng(int(s)) for s in seeds]
        alone_rngs = [make_rng(int(s)) for s in seeds]
        batched = next_tokens(logits, settings, batched_rngs)
        alone = [sample_row(logits[i], settings[i], alone_rngs[i]) for i in range(rows)]
        assert batched.tolist() == alone, (kind, step)
        # each row drew exactly as many numbers as alone: the next step's draws stay in step
        assert [r.random() for r in batched_rngs] == [r.random() for r in alone_rngs]
        assert next_tokens_per_row(logits, settings, [make_rng(int(s)) for s in seeds]).tolist() == alone


def test_a_tie_at_the_top_k_boundary_goes_through_sample_row():
    logits = np.zeros((3, VOCAB), dtype=np.float32)
    logits[:, :10] = 5.0  # ten tokens tie for the top 4
    settings = [SamplingSettings(top_k=4, top_p=0.9)] * 3
    for seed in range(20):
        alone = [sample_row(logits[i], settings[i], make_rng(seed + i)) for i in range(3)]
        assert next_tokens(logits, settings, [make_rng(seed + i) for i in range(3)]).tolist() == alone

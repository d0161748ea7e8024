"""The batched sampler gives every row exactly the token ``sample_row`` gives it alone."""

from __future__ import annotations

import numpy as np
import pytest

from glowing.runtime.sampling import (SamplingSettings, _sample_one_top_k, _top_k_plus_one, make_rng, next_tokens,
                                      next_tokens_per_row, sample_row)

VOCAB = 512


def _logits(rng: np.random.Generator, rows: int, kind: str, vocab: int = VOCAB) -> np.ndarray:
    if kind == "normal":
        return (rng.standard_normal((rows, vocab)) * 3).astype(np.float32)
    if kind == "peaked":  # a model sure of itself: one token far ahead
        x = rng.standard_normal((rows, vocab)).astype(np.float32)
        x[np.arange(rows), rng.integers(0, vocab, rows)] += 25
        return x
    if kind == "coarse":  # logits on a grid of 0.5: ties everywhere, at the top-k boundary too
        return (np.round(rng.standard_normal((rows, vocab)) * 4) / 2).astype(np.float32)
    raise ValueError(kind)


SETTINGS = [SamplingSettings(top_k=50, top_p=0.95), SamplingSettings(top_k=50, top_p=1.0),
            SamplingSettings(top_k=50, top_p=0.5, temperature=0.3), SamplingSettings(top_k=1),
            SamplingSettings(top_k=2, temperature=2.5), SamplingSettings(top_k=VOCAB - 1, top_p=0.9),
            SamplingSettings(top_k=VOCAB), SamplingSettings(top_k=0, top_p=0.8), SamplingSettings(temperature=0),
            SamplingSettings(top_k=7, top_p=0.99, temperature=1e-300), SamplingSettings(top_k=50, top_p=0.95,
                                                                                         temperature=1.7)]


# 512: top-k 50 through a full argpartition; 8195 (16 blocks of 512 and 3 more): through the
# block-maximum threshold (_top_k_plus_one), its last partial block too
@pytest.mark.parametrize("vocab", [VOCAB, 8195])
@pytest.mark.parametrize("kind", ["normal", "peaked", "coarse"])
def test_batched_sampler_equals_sample_row_for_every_row(kind, vocab):
    data = np.random.default_rng(hash((kind, vocab)) % 2**32)
    for step in range(30 if vocab == VOCAB else 12):
        rows = int(data.integers(1, 40))
        settings = [SETTINGS[int(i)] for i in data.integers(0, len(SETTINGS), rows)]
        if step % 3 == 0:  # a batch where every row shares its settings: the all-rows path
            settings = [SETTINGS[step % len(SETTINGS)]] * rows
        logits = _logits(data, rows, kind, vocab)
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


@pytest.mark.parametrize("kind", ["normal", "peaked", "coarse"])
def test_the_block_threshold_finds_the_top_k_a_full_partition_finds(kind):
    data = np.random.default_rng(7)
    for vocab, k in ((8192, 50), (8195, 50), (50257, 50), (8192, 1), (8192, 5)):
        logits = _logits(data, 9, kind, vocab)
        logits[3, vocab - 2:] = logits[3].max() + 1  # the largest in the last, partial block
        found = _top_k_plus_one(logits, k)
        assert found is not None, (vocab, k)  # the shortcut applies to a real vocabulary
        tokens, tied, values = found
        assert (values == np.take_along_axis(logits, tokens, axis=-1)).all()
        top = -np.sort(-logits, axis=-1)[:, : k + 1]
        assert (tied == (top[:, k - 1] == top[:, k])).all()
        for row in np.flatnonzero(~tied):
            expected = np.argsort(-logits[row], kind="stable")[:k]  # most likely first, ties by token id
            assert tokens[row].tolist() == expected.tolist()
    nan = _logits(data, 2, "normal", 8192)
    nan[1, :] = np.nan
    assert _top_k_plus_one(nan, 50) is None  # NaN logits: left to the general path
    assert _top_k_plus_one(_logits(data, 2, "normal", 512), 50) is None  # too few blocks for k


@pytest.mark.parametrize("vocab", [VOCAB, 8195])
@pytest.mark.parametrize("kind", ["normal", "peaked", "coarse"])
def test_a_batch_of_one_row_gets_the_token_sample_row_gives(kind, vocab):
    """A lone row (batch 1, or the only row with its top-k) takes ``_sample_one_top_k``: every top-k
    setting, ties at the boundary (coarse logits), the partial last block (8195), a k too large for the
    block threshold (VOCAB - 1 on 512) and an overflowing temperature fall back or agree."""
    data = np.random.default_rng(hash(("one", kind, vocab)) % 2**32)
    for step in range(150):
        setting = SETTINGS[step % len(SETTINGS)]
        logits = _logits(data, 1, kind, vocab)
        seed = int(data.integers(0, 2**31))
        one, alone = make_rng(seed), make_rng(seed)
        assert next_tokens(logits, [setting], [one]).tolist() == [sample_row(logits[0], setting, alone)], (step, setting)
        assert one.random() == alone.random()  # one number drawn, as alone
    nan = _logits(data, 1, "normal", vocab)[0]
    nan[3] = np.nan
    setting = SamplingSettings(top_k=50, top_p=0.95, seed=1)
    assert _sample_one_top_k(nan, setting, make_rng(1)) == sample_row(nan, setting, make_rng(1))

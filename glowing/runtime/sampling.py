"""Sampling settings and the one sampler every generation backend uses.

Each row of a batch carries its own settings and its own random generator, seeded by that
row's seed: a row's text depends on its prompt, settings and seed, never on its batch partners.
The draw is an inverse-CDF lookup of one uniform number per step, so a seeded row replays
exactly on any backend whose logits agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 64  # tokens to generate at most (generation also stops at end of text)
    temperature: float = 1.0  # 0 = greedy (argmax); below 1 sharper, above 1 flatter
    top_p: float = 1.0  # nucleus: keep the most likely tokens whose probabilities sum to top_p (1 = off)
    top_k: int = 0  # keep only the k most likely tokens (0 = off)
    seed: int | None = None  # per-row seed; None draws fresh entropy

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ValueError(f"SamplingSettings.{name}={getattr(self, name)!r}: {rule}")

        check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0, "max_new_tokens",
              "must be an int >= 0")
        check(math.isfinite(self.temperature) and self.temperature >= 0, "temperature", "must be finite and >= 0")
        check(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "must be an int >= 0")
        check(self.seed is None or (isinstance(self.seed, int) and self.seed >= 0), "seed",
              "must be None or an int >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_rng(seed: int | None) -> np.random.Generator:
    return np.random.default_rng(seed)


def sample_row(logits: np.ndarray, settings: SamplingSettings, rng: np.random.Generator) -> int:
    """One token id from one row of logits (shape ``(vocab,)``)."""
    if settings.greedy:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / settings.temperature
    vocab = x.shape[0]
    tokens = None  # the candidate token ids, in the order of ``x``; None = the whole vocabulary
    if 0 < settings.top_k < vocab:
        tokens = np.sort(np.argpartition(-x, settings.top_k - 1)[: settings.top_k])
        x = x[tokens]
    if settings.top_p < 1.0:
        # Most likely first (a stable sort: ties keep token-id order, whatever the sort algorithm).
        order = np.argsort(-x, kind="stable")
        x = x[order]
        tokens = order if tokens is None else tokens[order]
    return _draw(x, tokens, settings, rng)


def _draw(x: np.ndarray, tokens: np.ndarray | None, settings: SamplingSettings, rng: np.random.Generator) -> int:
    """``sample_row``'s draw: ``x`` the candidates' float64 logits / temperature (most likely first
    when ``top_p`` < 1, else in token-id order), ``tokens`` their ids (None: the whole vocabulary)."""
    cumulative = np.cumsum(np.exp(x - x.max()))
    if settings.top_p < 1.0:
        keep = int(np.searchsorted(cumulative, settings.top_p * cumulative[-1])) + 1
        cumulative = cumulative[: min(keep, len(cumulative))]
    draw = rng.random() * cumulative[-1]
    index = min(int(np.searchsorted(cumulative, draw, side="right")), len(cumulative) - 1)
    return int(index if tokens is None else tokens[index])


def _sample_one_top_k(logits: np.ndarray, settings: SamplingSettings, rng: np.random.Generator) -> int:
    """``sample_row`` for one row with 0 < top_k < vocab and a temperature > 0, the same token from
    fewer passes over the vocabulary: the k largest float32 logits through the block-maximum
    threshold of ``_top_k_plus_one`` instead of a float64 copy and a partition of the whole row
    (a batch of one, where decoding spends most per token on Python and numpy calls). Where that
    shortcut does not apply, the k-th and (k+1)-th largest tie, or the temperature overflows,
    ``sample_row`` itself, before anything is drawn."""
    k, vocab = settings.top_k, logits.shape[0]
    blocks = vocab // TOP_K_GROUPS
    if blocks < 2 * (k + 1):
        return sample_row(logits, settings, rng)
    maxima = logits[: blocks * TOP_K_GROUPS].reshape(TOP_K_GROUPS, blocks).max(axis=0)
    if blocks * TOP_K_GROUPS < vocab:
        maxima = np.append(maxima, logits[blocks * TOP_K_GROUPS :].max())
    at = len(maxima) - k - 1
    candidates = np.flatnonzero(logits >= np.partition(maxima, at)[at])  # in token-id order
    if len(candidates) < k + 1:  # NaN logits
        return sample_row(logits, settings, rng)
    values = logits[candidates]
    order = np.argsort(-values, kind="stable")[: k + 1]  # most likely first, ties in token-id order
    if values[order[k - 1]] == values[order[k]]:
        return sample_row(logits, settings, rng)
    tokens = candidates[order[:k]]
    if settings.top_p >= 1.0:  # sample_row draws in token-id order without top-p
        tokens = np.sort(tokens)
    x = logits[tokens].astype(np.float64) / settings.temperature
    if not np.isfinite(x).all():
        return sample_row(logits, settings, rng)
    return _draw(x, tokens, settings, rng)


def next_tokens(logits: np.ndarray, settings: Sequence[SamplingSettings],
                rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """One token per row of ``logits`` (shape ``(batch, vocab)``), each row by its own settings.

    Exactly the token ``sample_row`` gives each row (tests/test_sampling.py), computed for the
    whole batch at once: rows that share a ``top_k`` go through one vectorized top-k / top-p /
    inverse-CDF draw (``_sample_top_k``); greedy rows take an argmax; a row without top-k, or whose
    k-th and (k+1)-th largest logits tie (where the per-row partition's choice decides), go through
    ``sample_row``; a group of one row through ``_sample_one_top_k``. Each row still draws one number
    from its own generator.
    """
    if all(s.greedy for s in settings):
        return np.argmax(logits, axis=-1).astype(np.int64)
    n = len(settings)
    out = np.empty(n, dtype=np.int64)
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(settings):
        if s.greedy:
            out[i] = int(np.argmax(logits[i]))
        elif 0 < s.top_k < logits.shape[1]:
            groups.setdefault(s.top_k, []).append(i)
        else:
            out[i] = sample_row(logits[i], s, rngs[i])
    for k, rows in groups.items():
        if len(rows) == 1:  # one row: quicker alone than through the batch's dozen array calls
            out[rows[0]] = _sample_one_top_k(logits[rows[0]], settings[rows[0]], rngs[rows[0]])
            continue
        idx = np.asarray(rows)
        sub = logits if len(rows) == n else logits[idx]
        tokens, tied, draws = _sample_top_k(sub, k, [settings[i] for i in rows], [rngs[i] for i in rows])
        out[idx] = tokens
        for j in np.flatnonzero(tied):  # sample_row again, with the number this row's generator gave
            out[rows[j]] = sample_row(logits[rows[j]], settings[rows[j]], _Drawn(float(draws[j])))
    return out


def next_tokens_per_row(logits: np.ndarray, settings: Sequence[SamplingSettings],
                        rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """``next_tokens`` one row at a time through ``sample_row``: the reference, and the baseline
    ``export.bench_decode`` measures against."""
    return np.fromiter((sample_row(row, s, rng) for row, s, rng in zip(logits, settings, rngs)),
                       dtype=np.int64, count=len(settings))


class _Drawn:
    """Stands for a row's generator in ``sample_row``: gives the number already drawn this step."""

    def __init__(self, value: float):
        self._value = value

    def random(self) -> float:
        return self._value


def _sample_top_k(logits: np.ndarray, k: int, settings: Sequence[SamplingSettings],
                  rngs: Sequence[np.random.Generator]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``sample_row`` for rows that all have ``top_k == k`` and a temperature > 0, vectorized.
    Returns the tokens, which rows had a tie at the top-k boundary (their token must be redone),
    and the uniform number each row drew."""
    rows, vocab = logits.shape
    at = np.arange(rows)
    # The k largest logits (top-k on the float32 logits picks the same set as on logits / T in
    # float64: dividing by T > 0 keeps the order, and distinct float32 values stay distinct), most
    # likely first, ties in token-id order; and whether the k-th and (k+1)-th largest tie.
    top = _top_k_plus_one(logits, k)
    if top is None:
        part = np.argpartition(logits, vocab - k - 1, axis=-1)[:, vocab - k - 1 :]  # (k+1)-th largest, then the k
        values = np.take_along_axis(logits, part, axis=-1)
        tied = values[:, 1:].min(axis=-1) == values[:, 0]
        tokens = np.sort(part[:, 1:], axis=-1)  # token-id order, as sample_row's np.sort
        descending = False
    else:
        tokens, tied, values = top
        descending = True
    temperature = np.fromiter((s.temperature for s in settings), dtype=np.float64, count=rows)
    top_p = np.fromiter((s.top_p for s in settings), dtype=np.float64, count=rows)
    nucleus = top_p < 1.0
    if descending and nucleus.all():
        x = values.astype(np.float64) / temperature[:, None]
    else:
        if descending:  # rows without top-p draw in token-id order, as sample_row
            tokens[~nucleus] = np.sort(tokens[~nucleus], axis=-1)
        x = np.take_along_axis(logits, tokens, axis=-1).astype(np.float64) / temperature[:, None]
    if not descending and nucleus.any():  # most likely first, ties in token-id order; rows without top-p stay in token-id order
        order = np.argsort(-x, axis=-1, kind="stable")
        if not nucleus.all():
            order[~nucleus] = np.arange(k)
        x = np.take_along_axis(x, order, axis=-1)
        tokens = np.take_along_axis(tokens, order, axis=-1)
    tied |= ~np.isfinite(x).all(axis=-1)  # an overflow (a tiny temperature): sample_row's own arithmetic
    with np.errstate(invalid="ignore", over="ignore"):  # those rows are redone
        cumulative = np.cumsum(np.exp(x - x.max(axis=-1, keepdims=True)), axis=-1)
    # sample_row's searchsorted(cumulative, top_p * total) + 1, and its draw's searchsorted(side="right"),
    # as counts (cumulative is sorted); sample_row computes the same float64 numbers in the same order.
    keep = np.where(nucleus, (cumulative < (top_p * cumulative[:, -1])[:, None]).sum(axis=-1) + 1, k)
    keep = np.minimum(keep, k)
    draws = np.fromiter((rng.random() for rng in rngs), dtype=np.float64, count=rows)
    draw = draws * cumulative[at, keep - 1]
    index = np.minimum((cumulative <= draw[:, None]).sum(axis=-1), keep - 1)
    return tokens[at, index], tied, draws


TOP_K_GROUPS = 16  # see _top_k_plus_one


def _top_k_plus_one(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Each row's k largest logits as token ids, most likely first, ties in token-id order, whether
    its k-th and (k+1)-th largest tie, and those k logits; None where this shortcut does not apply.

    A full ``argpartition`` reads every logit through a selection; this reads them with two
    vectorized passes instead: split each row into ``TOP_K_GROUPS`` strided slices and take their
    elementwise maximum (one maximum per ``vocab / TOP_K_GROUPS`` "block" of logits); the (k+1)-th
    largest block maximum is a threshold that at least k+1 logits reach (one per block above it),
    so every one of the k+1 largest logits is at or above it. Only those few candidates (about k+5
    per row) are then sorted, in token-id order with a stable sort, which also orders ties as
    ``sample_row`` does."""
    rows, vocab = logits.shape
    blocks = vocab // TOP_K_GROUPS
    if blocks < 2 * (k + 1):
        return None
    maxima = logits[:, : blocks * TOP_K_GROUPS].reshape(rows, TOP_K_GROUPS, blocks).max(axis=1)
    if blocks * TOP_K_GROUPS < vocab:
        maxima = np.concatenate([maxima, logits[:, blocks * TOP_K_GROUPS :].max(axis=1, keepdims=True)], axis=1)
    at = maxima.shape[1] - k - 1
    threshold = np.partition(maxima, at, axis=-1)[:, at]
    row, token = np.divmod(np.flatnonzero(logits >= threshold[:, None]), vocab)
    counts = np.bincount(row, minlength=rows)
    if counts.min() < k + 1:  # NaN logits: the comparison fails; leave them to the general path
        return None
    place = np.arange(len(row)) - (np.cumsum(counts) - counts)[row]
    ids = np.zeros((rows, counts.max()), dtype=np.int64)
    values = np.full((rows, counts.max()), -np.inf, dtype=logits.dtype)
    ids[row, place], values[row, place] = token, logits[row, token]
    order = np.argsort(-values, axis=-1, kind="stable")[:, : k + 1]  # candidates are in token-id order
    at = np.arange(rows)[:, None]
    top = values[at, order]
    return ids[at, order[:, :k]], top[:, k - 1] == top[:, k], top[:, :k]

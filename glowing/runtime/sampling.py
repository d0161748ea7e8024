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
    cumulative = np.cumsum(np.exp(x - x.max()))
    if settings.top_p < 1.0:
        keep = int(np.searchsorted(cumulative, settings.top_p * cumulative[-1])) + 1
        cumulative = cumulative[: min(keep, len(cumulative))]
    draw = rng.random() * cumulative[-1]
    index = min(int(np.searchsorted(cumulative, draw, side="right")), len(cumulative) - 1)
    return int(index if tokens is None else tokens[index])


def next_tokens(logits: np.ndarray, settings: Sequence[SamplingSettings],
                rngs: Sequence[np.random.Generator]) -> np.ndarray:
    """One token per row of ``logits`` (shape ``(batch, vocab)``), each row by its own settings."""
    if all(s.greedy for s in settings):
        return np.argmax(logits, axis=-1).astype(np.int64)
    return np.fromiter((sample_row(row, s, rng) for row, s, rng in zip(logits, settings, rngs)),
                       dtype=np.int64, count=len(settings))

"""Text generation over any backend: one decoding loop with a KV cache, shared by ONNX and PyTorch.

A backend supplies two calls (see ``CausalLM``); everything else is here: prompt encoding
(bos + normalized prompt, as the LM was trained), left padding with positions counted from
each row's first real token, the context-length guard, per-row sampling and stopping. Rows
that finish (end of text or their own ``max_new_tokens``) leave the batch and its KV cache at
once, so a long row never makes short ones wait and finished rows cost nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from glowing.runtime.files import TextCodec
from glowing.runtime.sampling import SamplingSettings, make_rng, next_tokens
from glowing.text import generation_prompt


class CausalLM(Protocol):
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: Any) -> tuple[np.ndarray, Any]:
        """Logits of the last position, float32 ``(batch, vocab)``, and the grown cache.
        ``past`` is None on the first call."""

    def select(self, past: Any, rows: np.ndarray, start: int = 0) -> Any:
        """The cache of ``rows`` only, in that order, from position ``start`` on (the columns
        before it are padding for every one of those rows)."""

    def concat(self, pasts: Sequence[Any], pads: Sequence[int]) -> Any:
        """One cache: each of ``pasts`` left-padded by ``pads[i]`` positions (zeros, masked), then
        their rows stacked in order."""


class Generator:
    def __init__(self, lm: CausalLM, codec: TextCodec, *, n_positions: int, eos_ids: set[int],
                 info: dict[str, Any]):
        self._lm = lm
        self._codec = codec
        self.n_positions = n_positions
        self.eos_ids = eos_ids
        self._info = info

    lm = property(lambda self: self._lm)  # the model calls, for the serving engine
    codec = property(lambda self: self._codec)
    backend = property(lambda self: self._info["backend"])
    precision = property(lambda self: self._info["precision"])
    providers = property(lambda self: list(self._info["providers"]))
    model_file = property(lambda self: Path(self._info["model_file"]))

    def info(self) -> dict[str, Any]:
        return {**self._info, "n_positions": self.n_positions}

    def generate(self, prompts: list[str], settings: SamplingSettings | Sequence[SamplingSettings]) -> list[str]:
        """The continuation of each prompt (without the prompt), in input order."""
        return self._codec.tokenizer.decode_batch(self.generate_ids(prompts, settings), skip_special_tokens=True)

    def generate_ids(self, prompts: list[str],
                     settings: SamplingSettings | Sequence[SamplingSettings]) -> list[list[int]]:
        """New token ids per prompt, end-of-text excluded."""
        rows = per_row(settings, len(prompts))
        prompt_ids, max_new = self.encode(prompts, rows)
        out: list[list[int]] = [[] for _ in prompts]
        active = np.array([i for i in range(len(prompts)) if max_new[i] > 0], dtype=np.int64)
        if len(active) == 0:
            return out
        input_ids, mask = left_pad([prompt_ids[i] for i in active], self._codec.pad_id)
        lengths = mask.sum(axis=1)
        positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)  # as transformers does
        logits, past = self._lm.forward(input_ids, mask, positions, None)
        rngs = {int(i): make_rng(rows[i].seed) for i in active}
        while True:
            tokens = next_tokens(logits, [rows[i] for i in active], [rngs[int(i)] for i in active])
            keep = []
            for j, (i, token) in enumerate(zip(active, tokens)):
                if int(token) in self.eos_ids:
                    continue
                out[i].append(int(token))
                if len(out[i]) < max_new[i]:
                    keep.append(j)
            if not keep:
                return out
            if len(keep) < len(active):
                keep_rows = np.asarray(keep, dtype=np.int64)
                past = self._lm.select(past, keep_rows)
                active, tokens = active[keep_rows], tokens[keep_rows]
                mask, lengths = mask[keep_rows], lengths[keep_rows]
            mask = np.concatenate([mask, np.ones((len(active), 1), dtype=np.int64)], axis=1)
            logits, past = self._lm.forward(tokens[:, None], mask, lengths[:, None].astype(np.int64), past)
            lengths = lengths + 1

    def encode(self, prompts: list[str], rows: list[SamplingSettings]) -> tuple[list[list[int]], list[int]]:
        """Prompt ids, cut from the left so that prompt + new tokens fit the model's context."""
        texts = [generation_prompt(p, self._codec.bos_token) for p in prompts]
        encodings = self._codec.encode_batch(texts, add_special_tokens=False)
        ids, max_new = [], []
        for enc, s in zip(encodings, rows):
            new = min(s.max_new_tokens, self.n_positions - 1)
            empty = self._codec.eos_id if self._codec.eos_id is not None else self._codec.pad_id
            seq = enc.ids[-(self.n_positions - new):] or [empty]  # no bos token and an empty prompt
            ids.append(seq)
            max_new.append(new)
        return ids, max_new


def per_row(settings: SamplingSettings | Sequence[SamplingSettings], n: int) -> list[SamplingSettings]:
    if isinstance(settings, SamplingSettings):
        return [settings] * n
    rows = list(settings)
    if len(rows) != n:
        raise ValueError(f"got {len(rows)} SamplingSettings for {n} prompts: give one, or one per prompt")
    return rows


def left_pad(ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(x) for x in ids)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, seq in enumerate(ids):
        input_ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    return input_ids, mask

"""Sentiment scoring over any backend: texts in, P(positive) per text out, in input order.

The backend only maps ``(input_ids, attention_mask)`` to logits; tokenization, truncation,
right padding and micro-batching live here so that every backend sees identical inputs.
Right padding is what makes a score independent of its batch partners: the GPT-2 classifier
reads its logit at the last non-pad token and its positions start at 0 on every row.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from glowing.runtime.files import TextCodec
from glowing.text import normalize

Forward = Callable[[np.ndarray, np.ndarray], np.ndarray]
HEAD_CHARS_PER_TOKEN = 8  # generous: English BPE tokens average 4-5 characters
HEAD_MARGIN = 4  # tokens past max_length that a cut head must still produce


class Scorer:
    def __init__(self, forward: Forward, codec: TextCodec, *, max_length: int, positive_index: int,
                 batch_size: int, info: dict[str, Any], row_workers: int = 1):
        """``row_workers`` > 1 (with ``batch_size`` 1): texts are scored on that many threads at once,
        one model call each; for a backend whose calls release the GIL and are thread-safe (ORT)."""
        if batch_size < 1 or row_workers < 1:
            raise ValueError(f"batch_size={batch_size}, row_workers={row_workers}: both must be >= 1")
        self._forward = forward
        self._pool = ThreadPoolExecutor(row_workers, "glowing-score") if row_workers > 1 and batch_size == 1 else None
        self.row_workers = row_workers if self._pool else 1
        self._codec = codec
        self._positive = positive_index
        self.max_length = max_length
        self.batch_size = batch_size
        self._info = info
        codec.tokenizer.enable_truncation(max_length)

    backend = property(lambda self: self._info["backend"])
    precision = property(lambda self: self._info["precision"])
    providers = property(lambda self: list(self._info["providers"]))
    model_file = property(lambda self: Path(self._info["model_file"]))

    def info(self) -> dict[str, Any]:
        return {**self._info, "max_length": self.max_length, "batch_size": self.batch_size,
                "row_workers": self.row_workers}

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text: normalized, special tokens added, truncated to ``max_length``.

        Only the head of a long text is tokenized (tokenizing a whole 2,000-word review to keep
        128 tokens cost more than the int8 model): cut at a space well past what ``max_length``
        tokens can span, and kept only when the head still overflows by ``HEAD_MARGIN`` tokens,
        so the ids are those of the whole text (tested against transformers' tokenizer)."""
        texts = [normalize(t) for t in texts]
        limit = self.max_length * HEAD_CHARS_PER_TOKEN
        heads = [_head(t, limit) for t in texts]
        encodings = self._codec.tokenizer.encode_batch(heads)
        redo = [i for i, (text, head, enc) in enumerate(zip(texts, heads, encodings))
                if len(head) < len(text) and sum(len(o.ids) for o in enc.overflowing) < HEAD_MARGIN]
        for i, enc in zip(redo, self._codec.tokenizer.encode_batch([texts[i] for i in redo])):
            encodings[i] = enc
        # An empty text may encode to nothing without an end-of-text post-processor.
        empty = [self._codec.eos_id if self._codec.eos_id is not None else self._codec.pad_id]
        return [e.ids or empty for e in encodings]

    def logits(self, texts: list[str]) -> np.ndarray:
        """Raw logits, shape ``(len(texts), num_labels)``, in input order."""
        return self.logits_from_ids(self.encode(texts))

    def logits_from_ids(self, ids: list[list[int]]) -> np.ndarray:
        """Logits of already encoded texts (see ``encode``): what the benchmark times as the model."""
        if self._pool is not None and len(ids) > 1:
            rows = self._pool.map(lambda seq: self._forward(*right_pad([seq], self._codec.pad_id))[0], ids)
            return np.stack(list(rows)).astype(np.float32, copy=False)
        order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths share a batch
        out: np.ndarray | None = None
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            input_ids, mask = right_pad([ids[i] for i in rows], self._codec.pad_id)
            logits = self._forward(input_ids, mask)
            if out is None:
                out = np.empty((len(ids), logits.shape[-1]), dtype=np.float32)
            out[rows] = logits
        return out if out is not None else np.empty((0, 2), dtype=np.float32)

    def score(self, texts: list[str]) -> list[float]:
        """P(positive) per text, in input order."""
        return self.probabilities(self.logits(texts))

    def probabilities(self, logits: np.ndarray) -> list[float]:
        logits = logits.astype(np.float64)
        if len(logits) == 0:
            return []
        logits -= logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        return (probs[:, self._positive] / probs.sum(axis=-1)).tolist()


def _head(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[:cut] if cut > 0 else text


def right_pad(ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(x) for x in ids)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return input_ids, mask

"""Sentiment scoring over any backend: texts in, P(positive) per text out, in input order.

The backend only maps ``(input_ids, attention_mask)`` to logits; tokenization, truncation,
right padding and the split of texts into model calls (``plan_calls``) live here so that every
backend sees identical inputs. Right padding is what makes a score independent of its batch
partners: the GPT-2 classifier reads its logit at the last non-pad token and its positions start
at 0 on every row.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from glowing.runtime.files import TextCodec
from glowing.text import normalize

Forward = Callable[[np.ndarray, np.ndarray], np.ndarray]
OnCall = Callable[[int, int, int], None]  # rows, padded positions (rows x longest), real tokens
HEAD_CHARS_PER_TOKEN = 8  # generous: English BPE tokens average 4-5 characters
HEAD_MARGIN = 4  # tokens past max_length that a cut head must still produce
# The planner's cost model, in positions: what a model call costs beyond the positions it computes,
# and the padded length at which attention doubles a position's cost. Fitted to timed calls of the
# cpu-preset classifier on this kind of machine (`python -m export.bench_scoring --fit`;
# docs/EXPORT.md, "Length-aware scoring calls"): with the export's last-position graph
# (export/classifier_graph.py) a call costs about 80 positions and no attention term shows (its last
# layer attends from one position); the fused graph before it fitted 16 and 512.
CALL_OVERHEAD = 80
ATTENTION_SPAN = 4096
# Padded positions per model call by default (TEI's max_batch_tokens, counted as padded models count)
MAX_BATCH_TOKENS = 8192


class Scorer:
    def __init__(self, forward: Forward, codec: TextCodec, *, max_length: int, positive_index: int,
                 batch_size: int, info: dict[str, Any], row_workers: int = 1,
                 max_batch_tokens: int = MAX_BATCH_TOKENS):
        """``batch_size``: rows per model call; ``max_batch_tokens``: padded positions (rows x longest)
        per model call, see ``plan_calls``. ``row_workers`` > 1 (with ``batch_size`` 1): texts are
        scored on that many threads at once, one model call each; for a backend whose calls release
        the GIL and are thread-safe (ORT)."""
        if min(batch_size, row_workers, max_batch_tokens) < 1:
            raise ValueError(f"batch_size={batch_size}, row_workers={row_workers}, max_batch_tokens="
                             f"{max_batch_tokens}: all must be >= 1")
        self._forward = forward
        self._pool = ThreadPoolExecutor(row_workers, "glowing-score") if row_workers > 1 and batch_size == 1 else None
        self.row_workers = row_workers if self._pool else 1
        self._codec = codec
        self._positive = positive_index
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self._info = info
        codec.tokenizer.enable_truncation(max_length)

    backend = property(lambda self: self._info["backend"])
    precision = property(lambda self: self._info["precision"])
    providers = property(lambda self: list(self._info["providers"]))
    model_file = property(lambda self: Path(self._info["model_file"]))

    def info(self) -> dict[str, Any]:
        return {**self._info, "max_length": self.max_length, "batch_size": self.batch_size,
                "max_batch_tokens": self.max_batch_tokens, "row_workers": self.row_workers}

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text: normalized, special tokens added, truncated to ``max_length``.

        Only the head of a long text is tokenized (tokenizing a whole 2,000-word review to keep
        128 tokens cost more than the int8 model): cut at a space well past what ``max_length``
        tokens can span, and kept only when the head still overflows by ``HEAD_MARGIN`` tokens,
        so the ids are those of the whole text (tested against transformers' tokenizer)."""
        texts = [normalize(t) for t in texts]
        limit = self.max_length * HEAD_CHARS_PER_TOKEN
        heads = [_head(t, limit) for t in texts]
        encodings = self._codec.encode_batch(heads)
        redo = [i for i, (text, head, enc) in enumerate(zip(texts, heads, encodings))
                if len(head) < len(text) and sum(len(o.ids) for o in enc.overflowing) < HEAD_MARGIN]
        for i, enc in zip(redo, self._codec.encode_batch([texts[i] for i in redo])):
            encodings[i] = enc
        # An empty text may encode to nothing without an end-of-text post-processor.
        empty = [self._codec.eos_id if self._codec.eos_id is not None else self._codec.pad_id]
        return [e.ids or empty for e in encodings]

    def logits(self, texts: list[str]) -> np.ndarray:
        """Raw logits, shape ``(len(texts), num_labels)``, in input order."""
        return self.logits_from_ids(self.encode(texts))

    def plan(self, ids: list[list[int]]) -> list[list[int]]:
        """The model calls that score these encoded texts: indices per call (see ``plan_calls``)."""
        return plan_calls([len(x) for x in ids], self.batch_size, self.max_batch_tokens)

    def logits_from_ids(self, ids: list[list[int]], calls: list[list[int]] | None = None,
                        on_call: OnCall | None = None) -> np.ndarray:
        """Logits of already encoded texts (see ``encode``), in input order: what the benchmark
        times as the model. ``calls``: the indices of each model call (default: ``plan(ids)``;
        with ``row_workers`` one text per call, on those threads). ``on_call(rows, padded
        positions, real tokens)`` runs after each model call, on the thread that made it."""
        if not ids:
            return np.empty((0, 2), dtype=np.float32)
        if calls is None and self._pool is not None and len(ids) > 1:
            calls = [[i] for i in range(len(ids))]
            logits = list(self._pool.map(lambda call: self._call(ids, call, on_call), calls))
        else:
            calls = self.plan(ids) if calls is None else calls
            logits = [self._call(ids, call, on_call) for call in calls]
        out = np.empty((len(ids), logits[0].shape[-1]), dtype=np.float32)
        for call, rows in zip(calls, logits):
            out[call] = rows
        return out

    def _call(self, ids: list[list[int]], call: list[int], on_call: OnCall | None) -> np.ndarray:
        input_ids, mask = right_pad([ids[i] for i in call], self._codec.pad_id)
        logits = self._forward(input_ids, mask)
        if on_call is not None:
            on_call(len(call), int(input_ids.size), int(mask.sum()))
        return logits

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


def plan_calls(lengths: Sequence[int], max_rows: int, max_tokens: int, *, call_overhead: float = CALL_OVERHEAD,
               attention_span: float = ATTENTION_SPAN) -> list[list[int]]:
    """Split texts of these token lengths into model calls: the indices of each call, shortest first.

    A call is right-padded to its longest text, so it computes rows x longest positions, the rest
    of them padding. The rule: sort the texts by length and cut the sorted run into consecutive
    calls of at most ``max_rows`` rows and ``max_tokens`` padded positions (a text longer than
    ``max_tokens`` goes alone), at the cuts that minimise the estimated cost of all the calls,

        cost(call) = call_overhead + rows x longest x (1 + longest / attention_span)

    found exactly by dynamic programming over the sorted run, in O(n x max_rows). Consecutive runs
    of the sorted texts lose nothing against any other grouping, since the cost only grows with
    the rows and the longest text of a call. ``call_overhead`` (in positions) is what a call costs
    beyond the positions it computes: it keeps short texts together rather than splitting them
    for a few positions of padding, and it is the most padding a merge may add per call it saves,
    so padding stays a small share of what long texts compute. ``attention_span`` prices attention,
    whose cost per position grows with the padded length (the length at which it doubles).
    """
    if max_rows < 1 or max_tokens < 1:
        raise ValueError(f"max_rows={max_rows}, max_tokens={max_tokens}: both must be >= 1")
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    n = len(order)
    best = [0.0] * (n + 1)  # best[j]: the cost of the cheapest plan for the j shortest texts
    start = [0] * (n + 1)  # where the last call of that plan starts
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        per_row = longest * (1 + longest / attention_span)
        best[j] = float("inf")
        for i in range(j - 1, max(j - max_rows, 0) - 1, -1):  # the last call: order[i:j]
            if i < j - 1 and (j - i) * longest > max_tokens:
                break
            cost = best[i] + call_overhead + (j - i) * per_row
            if cost < best[j]:
                best[j], start[j] = cost, i
    calls = []
    while n:
        calls.append(order[start[n] : n])
        n = start[n]
    return calls[::-1]


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

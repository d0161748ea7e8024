"""Metric functions, plain numpy: binary classification metrics, distinct-n, perplexity."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> list[list[int]]:
    """``[[tn, fp], [fn, tp]]``: rows are the true class (negative, positive)."""
    y_true, y_pred = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    return [[int(np.sum((y_true == t) & (y_pred == p))) for p in (0, 1)] for t in (0, 1)]


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive outscores a random
    negative, ties counting one half (Mann-Whitney U with average ranks)."""
    y_true, scores = np.asarray(y_true).astype(int), np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y_true.sum()), int((1 - y_true).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y_true == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_metrics(y_true: np.ndarray, p_positive: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, precision, recall, F1 (positive class), ROC AUC, confusion matrix, and a
    per-class report like scikit-learn's ``classification_report``."""
    y_true = np.asarray(y_true).astype(int)
    y_pred = (np.asarray(p_positive) >= threshold).astype(int)
    (tn, fp), (fn, tp) = confusion(y_true, y_pred)
    report = {}
    for name, t_p, f_p, f_n, support in (("negative", tn, fn, fp, tn + fp), ("positive", tp, fp, fn, tp + fn)):
        prec = t_p / (t_p + f_p) if t_p + f_p else 0.0
        rec = t_p / (t_p + f_n) if t_p + f_n else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        report[name] = {"precision": prec, "recall": rec, "f1": f1, "support": int(support)}
    return {
        "n": int(len(y_true)),
        "accuracy": float((tp + tn) / len(y_true)),
        "precision": report["positive"]["precision"],
        "recall": report["positive"]["recall"],
        "f1": report["positive"]["f1"],
        "roc_auc": roc_auc(y_true, p_positive),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "classification_report": report,
    }


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct n-grams over all n-grams in a set of texts (whitespace words, lower-cased)."""
    total, seen = 0, set()
    for text in texts:
        words = text.lower().split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per predicted token)."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one predicted token")
    return float(math.exp(total_nll / n_tokens))


def mean_std(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std())

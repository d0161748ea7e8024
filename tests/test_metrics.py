"""Metric functions against values computed by hand."""

import math

import numpy as np
import pytest

from training.metrics import binary_metrics, confusion, distinct_n, perplexity, roc_auc

Y = np.array([1, 0, 1, 1, 0])
P = np.array([0.9, 0.4, 0.35, 0.8, 0.6])  # predictions at 0.5: 1 0 0 1 1


def test_confusion_matrix_rows_are_true_classes():
    assert confusion(Y, P >= 0.5) == [[1, 1], [1, 2]]  # [[tn, fp], [fn, tp]]


def test_binary_metrics_by_hand():
    m = binary_metrics(Y, P)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["precision"] == pytest.approx(2 / 3)  # tp / (tp + fp) = 2 / 3
    assert m["recall"] == pytest.approx(2 / 3)  # tp / (tp + fn) = 2 / 3
    assert m["f1"] == pytest.approx(2 / 3)
    # positives 0.9, 0.35, 0.8 vs negatives 0.4, 0.6: 4 of 6 pairs ordered correctly
    assert m["roc_auc"] == pytest.approx(4 / 6)
    neg = m["classification_report"]["negative"]
    assert neg["precision"] == pytest.approx(1 / 2) and neg["recall"] == pytest.approx(1 / 2)
    assert neg["support"] == 2 and m["classification_report"]["positive"]["support"] == 3


def test_roc_auc_ties_count_half_and_degenerate_cases():
    assert roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert roc_auc([0, 1], [0.2, 0.8]) == 1.0 and roc_auc([0, 1], [0.8, 0.2]) == 0.0
    assert math.isnan(roc_auc([1, 1], [0.1, 0.2]))


def test_roc_auc_matches_sklearn_on_random_scores():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.random(500), 2)  # rounding makes ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))


def test_distinct_n_by_hand():
    texts = ["a b a b", "A b c"]
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)  # {a, b, c} of 7 words
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)  # {ab, ba, bc} of 5 bigrams
    assert distinct_n([], 2) == 0.0


def test_perplexity_by_hand():
    assert perplexity(2 * math.log(4), 2) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)

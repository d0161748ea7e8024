"""Stage ``baseline``: TF-IDF (word 1-2 grams) + logistic regression on IMDB train.

It is the reference row of the classifier report (its accuracy: docs/TRAINING.md, "Results") and the
independent judge of generated reviews: a model the generator is never tuned against.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from glowing.text import normalize
from training.config import BaselineConfig


def train_baseline(cfg: BaselineConfig, texts: list[str], labels: np.ndarray):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    pipeline = make_pipeline(
        TfidfVectorizer(ngram_range=(1, cfg.ngram_max), min_df=cfg.min_df, sublinear_tf=True,
                        max_features=cfg.max_features or None, preprocessor=_preprocess),
        LogisticRegression(C=cfg.C, max_iter=1000, solver="liblinear"),
    )
    pipeline.fit(texts, np.asarray(labels).astype(int))
    return pipeline


def _preprocess(text: str) -> str:  # module-level so the fitted pipeline pickles
    return normalize(text).lower()


def save(pipeline, path: Path) -> None:
    import joblib

    joblib.dump(pipeline, path)


def load(path: Path):
    import joblib

    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m training --stages baseline`")
    return joblib.load(path)


def predict_proba(pipeline, texts: list[str]) -> np.ndarray:
    return pipeline.predict_proba(texts)[:, list(pipeline.classes_).index(1)]

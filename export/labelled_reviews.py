"""Real IMDB test reviews for the parity checks and the benchmark, in a fixed seeded sample.

Read straight from ``DATA_DIR/imdb/test.parquet`` (the shared-data layout ``python -m training``
reads): the export stage does not import the training code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMDB_TEST = Path("imdb") / "test.parquet"


class ReviewDataError(ValueError):
    """The labelled IMDB test reviews cannot be read (training has its own ``training.data.DataError``)."""


@dataclass
class Reviews:
    texts: list[str]
    labels: np.ndarray  # 0 negative, 1 positive
    origin: str

    def __len__(self) -> int:
        return len(self.texts)

    def sample(self, n: int, seed: int) -> Reviews:
        """``n`` reviews (all of them when ``n`` <= 0 or exceeds the split), in a seeded order."""
        order = np.random.default_rng(seed).permutation(len(self.texts))
        if 0 < n < len(order):
            order = order[:n]
        return self._take(order)

    def spread(self, n: int, seed: int) -> Reviews:
        """``n`` reviews at evenly spaced ranks of length, shortest to longest, then shuffled with
        ``seed``: varied lengths, so batches in input order carry much padding."""
        by_length = np.argsort([len(t) for t in self.texts], kind="stable")
        picks = by_length[np.unique(np.linspace(0, len(by_length) - 1, min(n, len(by_length))).round().astype(int))]
        return self._take(np.random.default_rng(seed).permutation(picks))

    def _take(self, order: np.ndarray) -> Reviews:
        return Reviews([self.texts[i] for i in order], self.labels[order], self.origin)


def load_imdb_test(data_dir: str | Path | None) -> Reviews:
    """IMDB test, labelled. Fails with a message that says what to pass when the file is absent."""
    if data_dir is None:
        raise ReviewDataError("the parity checks need labelled IMDB reviews: pass --data-dir (a folder holding "
                        "imdb/test.parquet, e.g. ../shared/data) or set GLOWING_DATA_DIR")
    path = Path(data_dir) / IMDB_TEST
    if not path.is_file():
        raise ReviewDataError(f"{path} is missing: --data-dir must hold imdb/test.parquet")
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=["text", "label"])
    except Exception as err:  # pyarrow raises several types for damaged files or missing columns
        raise ReviewDataError(f"{path} is not a Parquet file with 'text' and 'label' columns: {err}") from err
    texts = table.column("text").to_pylist()
    labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
    if len(texts) == 0 or not set(np.unique(labels).tolist()) <= {0, 1} or len(set(labels.tolist())) < 2:
        raise ReviewDataError(f"{path}: expected labelled reviews with both labels 0 and 1")
    return Reviews(texts, labels, str(path))

"""Load and validate IMDB (train, test, unsup) and SST-2 (train, validation).

From a directory laid out as ``imdb/{train,test,unsup}.parquet`` and
``sst2/{train,validation}.parquet`` (``--data-dir`` or ``GLOWING_DATA_DIR``), or, with no
directory, from the Hugging Face datasets hub (``stanfordnlp/imdb``, ``glue``/``sst2``).

IMDB test is for evaluation only: nothing in this package trains, tunes or stops early on it.
The files are sorted by label, so everything is shuffled here with the config's seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FILES = {
    ("imdb", "train"): ({0, 1}, "text"),
    ("imdb", "test"): ({0, 1}, "text"),
    ("imdb", "unsup"): ({-1}, "text"),
    ("sst2", "train"): ({0, 1}, "text"),
    ("sst2", "validation"): ({0, 1}, "text"),
}


class DataError(ValueError):
    pass


@dataclass
class Split:
    """Texts and labels (-1 where unlabelled), in a seeded random order."""

    name: str
    texts: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.texts)

    def take(self, idx: np.ndarray | list[int], name: str | None = None) -> Split:
        return Split(name or self.name, [self.texts[i] for i in idx], self.labels[np.asarray(idx, dtype=int)])

    def head(self, n: int) -> Split:
        return self if n <= 0 or n >= len(self) else self.take(np.arange(n))

    def where(self, label: int) -> Split:
        return self.take(np.flatnonzero(self.labels == label), f"{self.name}[label={label}]")


def data_files(data_dir: str | Path) -> dict[str, Path]:
    root = Path(data_dir)
    return {f"{ds}/{split}": root / ds / f"{split}.parquet" for ds, split in FILES}


def load_split(data_dir: str | Path | None, dataset: str, split: str, seed: int) -> Split:
    """One split, validated and shuffled with ``seed``."""
    if (dataset, split) not in FILES:
        raise DataError(f"unknown split {dataset}/{split}; known: {', '.join(f'{d}/{s}' for d, s in FILES)}")
    labels_ok, column = FILES[(dataset, split)]
    if data_dir is None:
        texts, labels, origin = _from_hub(dataset, split)
    else:
        root = Path(data_dir)
        if not root.is_dir():
            raise DataError(f"data directory {root} does not exist (give --data-dir or GLOWING_DATA_DIR "
                            "a folder holding imdb/ and sst2/ Parquet files)")
        path = root / dataset / f"{split}.parquet"
        texts, labels = _read_parquet(path, column)
        origin = str(path)
    labels = _validate(origin, texts, labels, labels_ok)
    order = np.random.default_rng(seed).permutation(len(texts))
    log.debug("loaded %s: %d rows", origin, len(texts))
    return Split(f"{dataset}/{split}", [texts[i] for i in order], labels[order])


def _read_parquet(path: Path, column: str) -> tuple[list[str], np.ndarray]:
    import pyarrow.parquet as pq

    if not path.exists():
        raise DataError(f"{path} is missing (expected {path.parent.name}/{path.name} under the data directory)")
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for damaged files
        raise DataError(f"{path} is not a readable Parquet file: {err}") from err
    missing = [c for c in (column, "label") if c not in table.column_names]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)} "
                        f"(has: {', '.join(table.column_names)}; expected '{column}' and 'label')")
    texts = table.column(column).to_pylist()
    labels = np.asarray(table.column("label").to_pylist(), dtype=object)
    return texts, labels


def _validate(origin: str, texts: list, labels: np.ndarray, labels_ok: set[int]) -> np.ndarray:
    if len(texts) == 0:
        raise DataError(f"{origin} is empty: the split needs at least one row")
    bad_text = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad_text is not None:
        raise DataError(f"{origin}: row {bad_text} has a non-string text ({texts[bad_text]!r})")
    try:
        as_int = labels.astype(np.int64)
    except (TypeError, ValueError) as err:
        raise DataError(f"{origin}: column 'label' must hold integers ({err})") from err
    unexpected = sorted(set(np.unique(as_int).tolist()) - labels_ok)
    if unexpected:
        raise DataError(f"{origin}: unexpected label value(s) {unexpected}; this split allows {sorted(labels_ok)}")
    if labels_ok == {0, 1} and len(set(as_int.tolist())) < 2:
        raise DataError(f"{origin}: only one class present; a labelled split needs both 0 and 1")
    return as_int


def _from_hub(dataset: str, split: str) -> tuple[list[str], np.ndarray, str]:
    origin = {"imdb": "stanfordnlp/imdb", "sst2": "glue/sst2"}[dataset] + f":{split}"
    try:
        import datasets
    except ImportError as err:
        raise DataError("no data directory given and the `datasets` package is not installed: pass "
                        "--data-dir (a folder with imdb/ and sst2/ Parquet files) or pip install "
                        "'glowing[hub]'") from err
    try:
        if dataset == "imdb":
            ds = datasets.load_dataset("stanfordnlp/imdb", split=split)
            texts = ds["text"]
        else:
            ds = datasets.load_dataset("glue", "sst2", split=split)
            texts = ds["sentence"]
    except Exception as err:
        raise DataError(f"no data directory given and the Hugging Face hub is unreachable for {origin} "
                        f"({type(err).__name__}: {err}); pass --data-dir or set GLOWING_DATA_DIR") from err
    return list(texts), np.asarray(ds["label"], dtype=object), f"hub {origin}"


def train_val_split(train: Split, val_fraction: float, seed: int) -> tuple[Split, Split]:
    """Hold out a stratified share of IMDB train for validation (never IMDB test)."""
    rng = np.random.default_rng(seed + 1)
    val_idx: list[int] = []
    for label in (0, 1):
        idx = np.flatnonzero(train.labels == label)
        n_val = max(1, int(round(len(idx) * val_fraction)))
        val_idx.extend(rng.choice(idx, size=n_val, replace=False).tolist())
    val_mask = np.zeros(len(train), dtype=bool)
    val_mask[val_idx] = True
    return (train.take(np.flatnonzero(~val_mask), "imdb/train[fit]"),
            train.take(np.flatnonzero(val_mask), "imdb/train[val]"))


def sst2_holdout_split(train: Split, n_holdout: int, min_words: int, seed: int) -> tuple[Split, Split]:
    """Clean SST-2 train, then hold out ``n_holdout`` of its sentences for choosing the mix.

    SST-2 validation stays unseen: this hold-out stands in for it. SST-2 train holds every
    labelled phrase of its sentences, so a random hold-out would be answered by its own
    sub-phrases and parents in training. Held out here: random rows of at least ``min_words``
    words (mostly whole sentences, like the validation set), and removed from training: every
    row sharing a 5-word span with a held-out row, and every 3-4 word row that is a span of one.
    Exact duplicates are dropped and the 5 texts carrying both labels are dropped entirely.
    """
    texts = [t.strip() for t in train.texts]
    seen: dict[str, int] = {}
    conflicting: set[str] = set()
    for text, label in zip(texts, train.labels.tolist()):
        if seen.setdefault(text, label) != label:
            conflicting.add(text)
    keep, first = [], set()
    for i, text in enumerate(texts):
        if text and text not in conflicting and text not in first:
            first.add(text)
            keep.append(i)
    words = {i: texts[i].split() for i in keep}
    rng = np.random.default_rng(seed + 2)
    candidates = np.array([i for i in keep if len(words[i]) >= min_words], dtype=int)
    if len(candidates) < n_holdout:
        raise DataError(f"{train.name}: only {len(candidates)} rows of >= {min_words} words, fewer than the "
                        f"{n_holdout} asked for by data.sst2_holdout")
    held = set(rng.choice(candidates, size=n_holdout, replace=False).tolist())
    spans5, short_spans = set(), set()
    for i in held:
        w = words[i]
        spans5.update(" ".join(w[k : k + 5]) for k in range(len(w) - 4))
        for n in (3, 4):
            short_spans.update(" ".join(w[k : k + n]) for k in range(len(w) - n + 1))

    def leaks(i: int) -> bool:
        w = words[i]
        if len(w) >= 5:
            return any(" ".join(w[k : k + 5]) in spans5 for k in range(len(w) - 4))
        return len(w) >= 3 and texts[i] in short_spans

    fit = [i for i in keep if i not in held and not leaks(i)]
    held_idx = [i for i in keep if i in held]
    log.info("%s: %d rows -> %d for training, %d held out (%d duplicates or conflicting, %d removed as spans of "
             "held-out sentences)", train.name, len(train), len(fit), len(held_idx), len(train) - len(keep),
             len(keep) - len(fit) - len(held_idx))
    clean = Split(train.name, texts, train.labels)
    return clean.take(fit, "sst2/train[fit]"), clean.take(held_idx, "sst2/train[val]")

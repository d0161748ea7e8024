"""Shared fixtures: tiny synthetic data in the shared-data layout, and tiny trained artifacts.

Everything is offline and built in seconds; nothing here reads ../shared or the hub.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# BentoML's home (model store, Bentos) for this session only: the export registers its models and
# the Bento tests build, and none of it may land in the user's ~/bentoml. Set before anything
# imports bentoml, which reads it once; `bentoml serve` subprocesses inherit it.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="glowing-test-bentoml-")
atexit.register(shutil.rmtree, os.environ["BENTOML_HOME"], ignore_errors=True)

POSITIVE = "great wonderful superb moving brilliant delightful loved best touching excellent".split()
NEGATIVE = "awful boring terrible dull worst waste stupid bad painful mess".split()
NEUTRAL = ("the movie film plot actor story scene director cast was is and a of it this that with "
           "music ending character script camera").split()

# Small enough to train in seconds, big enough that every stage has real work to do.
TINY_OVERRIDES = [
    "tokenizer.vocab_size=400", "tokenizer.min_frequency=1",
    "lm.n_layer=1", "lm.n_embd=32", "lm.n_head=2", "lm.n_positions=64", "lm.block_size=32",
    "lm.batch_size=4", "lm.steps=6", "lm.warmup_steps=1",
    "generator.block_size=32", "generator.batch_size=4", "generator.steps=4", "generator.warmup_steps=1",
    "classifier.n_layer=1", "classifier.n_embd=32", "classifier.n_head=2", "classifier.max_length=48",
    "classifier.batch_size=16", "classifier.epochs=2", "classifier.warmup_steps=1", "classifier.sst2_repeats=1.0",
    "classifier.bucket_batch_sizes=[]",
    "baseline.min_df=1",
    "eval.ppl_reviews=10", "eval.n_samples=4", "eval.max_new_tokens=8", "eval.gen_batch_size=4",
]


def review(rng: random.Random, label: int) -> str:
    words = []
    for _ in range(rng.randint(8, 40)):
        pool = (POSITIVE if label == 1 else NEGATIVE) if rng.random() < 0.25 else NEUTRAL
        words.append(rng.choice(pool))
    text = " ".join(words).capitalize() + "."
    return text.replace(" and ", ".<br /><br />And ", 1) if rng.random() < 0.3 else text


def write_split(path: Path, texts: list[str], labels: list[int], text_column: str = "text") -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({text_column: texts, "label": labels}), path)


def make_data_dir(root: Path, seed: int = 0, sizes: dict | None = None) -> Path:
    """imdb/{train,test,unsup}.parquet and sst2/{train,validation}.parquet, sorted by label
    like the real files."""
    rng = random.Random(seed)
    sizes = sizes or {"imdb/train": 160, "imdb/test": 80, "imdb/unsup": 60, "sst2/train": 120, "sst2/validation": 40}
    for key, n in sizes.items():
        if key.endswith("unsup"):
            labels = [-1] * n
            texts = [review(rng, rng.randint(0, 1)) for _ in range(n)]
        else:
            labels = [0] * (n // 2) + [1] * (n - n // 2)
            texts = [review(rng, y) for y in labels]
        write_split(root / f"{key}.parquet", texts, labels)
    return root


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory, tiny_data_dir) -> Path:
    """A complete artifacts directory from the tiny preset on tiny data (about 5-10 s)."""
    from training.__main__ import main

    out = tmp_path_factory.mktemp("artifacts")
    args = ["--preset", "tiny", "--data-dir", str(tiny_data_dir), "--out", str(out)]
    for item in TINY_OVERRIDES:
        args += ["--set", item]
    assert main(args) == 0
    return out

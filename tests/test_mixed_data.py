"""The classifier's IMDB + SST-2 mix: the SST-2 hold-out, the epoch's examples, length buckets,
the normalizer, and the report's rows by length."""

import json

import numpy as np
import pytest

from support import make_data_dir, tiny_args
from training.__main__ import main
from training.classifier import bucket_batches, epoch_examples
from training.config import ConfigError, load_config
from training.data import Split, sst2_holdout_split
from training.evaluate import accuracy_by_length


def _sst2(rows: list[tuple[str, int]]) -> Split:
    return Split("sst2/train", [t + " " for t, _ in rows], np.array([y for _, y in rows]))


def test_sst2_holdout_removes_sub_phrases_duplicates_and_conflicts():
    sentence = "a gorgeous , witty , seductive movie that never lets up"  # 11 words
    rows = [(sentence, 1), ("gorgeous , witty , seductive movie", 1), ("witty , seductive", 1),
            ("the dullest film of the year and then some more", 0), ("dullest film", 0),
            ("a mess", 0), ("a mess", 0), ("fine", 1), ("fine", 0)]
    fit, held = sst2_holdout_split(_sst2(rows), n_holdout=2, min_words=10, seed=0)
    assert sorted(held.texts) == sorted([sentence, "the dullest film of the year and then some more"])
    # Spans of held-out sentences (3+ words) are gone; 1-2 word phrases are generic and stay.
    assert "gorgeous , witty , seductive movie" not in fit.texts and "witty , seductive" not in fit.texts
    assert "dullest film" in fit.texts
    assert fit.texts.count("a mess") == 1  # exact duplicate dropped
    assert "fine" not in fit.texts  # carries both labels: dropped
    assert all(not t.endswith(" ") for t in fit.texts + held.texts)  # GLUE's trailing space stripped


def test_sst2_holdout_needs_enough_sentences():
    from training.data import DataError

    with pytest.raises(DataError, match="data.sst2_holdout"):
        sst2_holdout_split(_sst2([("too short", 1), ("also short", 0)]), n_holdout=5, min_words=10, seed=0)


def test_epoch_examples_every_imdb_review_once_and_sst2_balanced():
    rng = np.random.default_rng(0)
    sst2_labels = np.array([1] * 70 + [0] * 30)
    ex = epoch_examples(50, sst2_labels, repeats=2.0, balance=True, rng=rng)
    assert sorted(ex[ex < 50].tolist()) == list(range(50))
    sst2 = ex[ex >= 50] - 50
    assert len(sst2) == 200 and (sst2_labels[sst2] == 0).sum() == 100  # half negative, each phrase seen
    assert set(sst2.tolist()) == set(range(100))
    assert len(epoch_examples(50, sst2_labels, repeats=0.0, balance=True, rng=rng)) == 50
    unbalanced = epoch_examples(50, sst2_labels, repeats=1.0, balance=False, rng=rng)
    assert sorted(unbalanced[unbalanced >= 50].tolist()) == list(range(50, 150))  # a plain pass


def test_bucket_batches_keep_short_texts_with_short_texts():
    rng = np.random.default_rng(0)
    lengths = np.array([5] * 300 + [100] * 40 + [400] * 40)
    examples = np.arange(len(lengths))
    batches = bucket_batches(lengths, examples, [64, 16, 8], [32, 128], rng)
    assert sorted(np.concatenate(batches).tolist()) == examples.tolist()  # each example once
    for batch in batches:
        widths = set(lengths[batch].tolist())
        assert len(widths) == 1  # one bucket per batch: a 5-token phrase is never padded to 400
        assert len(batch) <= {5: 64, 100: 16, 400: 8}[widths.pop()]
    assert len(batches) == 5 + 3 + 5


def test_mix_config_is_validated():
    with pytest.raises(ConfigError, match="classifier.bucket_batch_sizes"):
        load_config("tiny", ["classifier.length_buckets=[16, 64]", "classifier.bucket_batch_sizes=[8, 8]"])
    with pytest.raises(ConfigError, match="classifier.length_buckets"):
        load_config("tiny", ["classifier.length_buckets=[64, 16]"])
    with pytest.raises(ConfigError, match="classifier.normalizer"):
        load_config("tiny", ['classifier.normalizer="lower+ptb"'])  # needs the classifier's own vocabulary
    with pytest.raises(ConfigError, match="classifier.sst2_repeats"):
        load_config("tiny", ["classifier.sst2_repeats=-1"])


@pytest.mark.slow
def test_normalizer_joins_ptb_tokens_and_travels_with_the_tokenizer(tiny_data_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "norm"
    assert main(tiny_args(tiny_data_dir, out, "--stages", "classifier",
                          overrides=["classifier.vocab_size=400", 'classifier.normalizer="lower+ptb"'])) == 0
    tok = AutoTokenizer.from_pretrained(out / "classifier")
    assert tok("it 's a great movie , really . ")["input_ids"] == tok("It's a GREAT movie, really.")["input_ids"]
    from tokenizers import Tokenizer  # what the runtime (glowing/runtime) loads: the normalizer is in the file

    raw = Tokenizer.from_file(str(out / "classifier/tokenizer.json"))
    assert raw.encode("do n't miss it ").ids == raw.encode("Don't miss it").ids
    info = json.loads((out / "manifest.json").read_text())["models"]["classifier"]
    assert info["sst2_train_phrases"] > 0 and {"imdb_accuracy", "sst2_accuracy"} <= set(info)


@pytest.mark.slow
def test_training_never_loads_sst2_validation(tmp_path, loaded_splits):
    data = make_data_dir(tmp_path / "data", sizes={"imdb/train": 160, "imdb/test": 40, "imdb/unsup": 40,
                                                    "sst2/train": 120, "sst2/validation": 40})
    assert main(tiny_args(data, tmp_path / "a", "--stages", "classifier", overrides=["classifier.vocab_size=400"])) == 0
    assert "sst2/train" in loaded_splits
    assert "sst2/validation" not in loaded_splits and "imdb/test" not in loaded_splits


def test_accuracy_by_length_rows():
    texts = ["w " * n for n in (1, 2, 3, 4, 10, 20, 30, 40)]
    y = np.array([1, 0, 1, 0, 1, 0, 1, 0])
    p = np.array([0.9, 0.1, 0.9, 0.1, 0.1, 0.9, 0.1, 0.9])  # right on short texts, wrong on long ones
    rows = accuracy_by_length(texts, y, {"classifier": p}, bins=2)
    assert [r["words"] for r in rows] == ["1-4", "10-40", "all"]
    assert [r["classifier"] for r in rows] == [1.0, 0.0, 0.5]
    assert [r["n"] for r in rows] == [4, 4, 8]


def test_report_has_length_rows(tiny_artifacts):
    report = json.loads((tiny_artifacts / "reports/classifier/classifier.json").read_text())
    imdb = report["by_length"]["imdb_test"]
    assert len(imdb) == 5 and imdb[-1]["words"] == "all"  # four quartiles, then all
    assert sum(r["n"] for r in imdb[:4]) == imdb[-1]["n"]
    assert imdb[-1]["classifier"] == pytest.approx(report["classifier"]["imdb_test"]["accuracy"])
    assert len(report["by_length"]["sst2_validation"]) == 3
    assert "## Accuracy by length (words)" in (tiny_artifacts / "reports/classifier/classifier.md").read_text()

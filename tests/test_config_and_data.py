"""Bad inputs give clear errors: presets, overrides, data directories, columns, splits."""

from pathlib import Path

import numpy as np
import pytest

from support import make_data_dir, tiny_args, write_split
from training.__main__ import main
from training.config import ConfigError, available_presets, load_config
from training.data import DataError, load_split, train_val_split


def test_presets_exist_and_load():
    assert {"tiny", "cpu", "gpu"} <= set(available_presets())
    for name in ("tiny", "cpu", "gpu"):
        cfg = load_config(name)
        assert cfg.preset == name


def test_overrides_apply_with_types():
    cfg = load_config("tiny", ["lm.n_layer=3", "lm.lr=1e-2", "classifier.init=lm", "eval.prompt=\"A film\"",
                               "seed=7", "classifier.lr=1"])
    assert (cfg.lm.n_layer, cfg.lm.lr, cfg.classifier.init, cfg.eval.prompt, cfg.seed) == (3, 1e-2, "lm", "A film", 7)
    assert isinstance(cfg.classifier.lr, float)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match=r"unknown preset 'huge'.*cpu.*gpu.*tiny"):
        load_config("huge")


@pytest.mark.parametrize("override, pattern", [
    ("lm.n_layers=4", r"unknown config key 'lm.n_layers'.*n_layer"),
    ("model.n_layer=4", r"unknown config section 'model'"),
    ("bogus=1", r"unknown config key 'bogus'"),
    ("lm.n_layer=four", r"lm.n_layer must be a int"),
    ("lm.n_layer", r"expected section.key=value"),
    ("lm.n_embd=99", r"lm.n_embd must be divisible by lm.n_head"),
    ("eval.top_p=1.5", r"eval.top_p must be in \(0, 1\]"),
    ("lm.block_size=4096", r"lm.block_size must be <= lm.n_positions"),
])
def test_bad_overrides_are_named(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config("tiny", [override])


def test_cli_reports_config_errors_without_traceback(capsys, caplog, tmp_path):
    assert main(["--preset", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown preset 'nope'" in caplog.text
    assert main(["--preset", "tiny", "--stages", "tokenizer,train", "--out", str(tmp_path)]) == 2
    assert "unknown stage(s) train" in caplog.text


def test_cli_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for flag in ("--preset", "--data-dir", "--out", "--stages", "--force", "--set", "--generator-from",
                 "--classifier-from", "--print-config"):
        assert flag in out


def test_missing_data_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "nowhere", "imdb", "train", 0)


def test_missing_file_is_named(tmp_path):
    (tmp_path / "imdb").mkdir()
    with pytest.raises(DataError, match=r"imdb/train.parquet is missing"):
        load_split(tmp_path, "imdb", "train", 0)


def test_wrong_columns_are_named(tmp_path):
    write_split(tmp_path / "imdb/train.parquet", ["good", "bad"], [1, 0], text_column="review")
    with pytest.raises(DataError, match=r"train.parquet lacks column\(s\) text \(has: review, label"):
        load_split(tmp_path, "imdb", "train", 0)


def test_empty_split(tmp_path):
    write_split(tmp_path / "sst2/validation.parquet", [], [])
    with pytest.raises(DataError, match=r"validation.parquet is empty"):
        load_split(tmp_path, "sst2", "validation", 0)


def test_bad_labels(tmp_path):
    write_split(tmp_path / "imdb/test.parquet", ["a", "b"], [1, 2])
    with pytest.raises(DataError, match=r"unexpected label value\(s\) \[2\]"):
        load_split(tmp_path, "imdb", "test", 0)
    write_split(tmp_path / "imdb/test.parquet", ["a", "b"], [1, 1])
    with pytest.raises(DataError, match="only one class"):
        load_split(tmp_path, "imdb", "test", 0)


def test_no_data_dir_and_no_hub_fails_clearly():
    # Tests run offline: either `datasets` is absent or the hub is unreachable; both must say what to do.
    with pytest.raises(DataError, match="--data-dir"):
        load_split(None, "imdb", "train", 0)


def test_cli_missing_data_dir_exit_code(tmp_path, caplog):
    assert main(["--preset", "tiny", "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "a")]) == 2
    assert "does not exist" in caplog.text


def test_split_is_shuffled_seeded_and_validation_is_stratified(tmp_path):
    make_data_dir(tmp_path)
    a = load_split(tmp_path, "imdb", "train", 1)
    b = load_split(tmp_path, "imdb", "train", 1)
    assert a.texts == b.texts
    assert a.labels[: len(a) // 2].sum() not in (0, len(a) // 2)  # file is sorted by label; we are not
    fit, val = train_val_split(a, 0.25, seed=1)
    assert len(fit) + len(val) == len(a) and not set(fit.texts) & set(val.texts)
    assert abs(val.labels.mean() - 0.5) < 0.05
    assert isinstance(a.labels, np.ndarray) and a.labels.dtype.kind == "i"


@pytest.mark.slow
def test_pipeline_never_reads_imdb_test_for_training(tmp_path, loaded_splits):
    """Training stages must not load imdb/test: only the eval stages may."""
    data = make_data_dir(tmp_path / "data")
    assert main(tiny_args(data, tmp_path / "a", "--stages", "tokenizer,lm,generator,classifier,baseline")) == 0
    assert "imdb/test" not in loaded_splits and "imdb/train" in loaded_splits


def test_classifier_vocab_needs_scratch():
    with pytest.raises(ConfigError, match=r"classifier.vocab_size must be 0, or >= 300"):
        load_config("tiny", ["classifier.vocab_size=5000", "classifier.init=lm"])

"""The tiny pipeline end to end: every artifact, every manifest key, skip/force/rerun, failures."""

import json
import math

import numpy as np
import pytest
import torch

from glowing import artifacts as A
from support import TINY_OVERRIDES, tiny_args
from training.__main__ import main

REQUIRED_METRICS = [
    "classifier.imdb_test.accuracy", "classifier.imdb_test.roc_auc", "classifier.imdb_test.f1",
    "classifier.sst2_validation.accuracy", "baseline.imdb_test.accuracy", "baseline.sst2_validation.accuracy",
    "generator.positive_test.perplexity", "generator.samples.mean_p_positive",
    "generator.samples.judge_mean_p_positive", "generator.samples.distinct_2", "generator.samples.distinct_1",
    "generator.samples.this_movie.mean_p_positive", "generator.samples.test_prefixes.judge_mean_p_positive",
]




def test_every_artifact_is_written(tiny_artifacts):
    for rel in ["tokenizer/tokenizer.json", "lm/config.json", "lm/model.safetensors", "generator/model.safetensors",
                "generator/tokenizer.json", "classifier/model.safetensors", "classifier/tokenizer.json",
                "classifier/max_length.txt", f"baseline/{A.BASELINE_FILE}", "config.json", "manifest.json",
                "reports/classifier/classifier.md", "reports/classifier/classifier.json",
                "reports/classifier/roc_imdb_test.png", "reports/classifier/confusion_imdb_test.png",
                "reports/classifier/roc_sst2_validation.png", "reports/classifier/confusion_sst2_validation.png",
                "reports/generator/generator.md", "reports/generator/generator.json",
                "reports/generator/samples.md", "reports/generator/p_positive_hist.png"]:
        path = tiny_artifacts / rel
        assert path.exists() and path.stat().st_size > 0, rel
    for png in tiny_artifacts.glob("reports/*/*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_manifest_has_every_key_and_finite_metrics(tiny_artifacts):
    manifest = A.read_manifest(tiny_artifacts)
    metrics = A.flatten(manifest["metrics"])
    for key in REQUIRED_METRICS:
        assert key in metrics, key
        assert math.isfinite(metrics[key]), key
    assert 0 <= metrics["classifier.imdb_test.accuracy"] <= 1
    assert metrics["generator.positive_test.perplexity"] > 1
    assert manifest["preset"] == "tiny"
    assert manifest["config"]["lm"]["n_embd"] == 32  # the resolved config, overrides included
    assert json.loads((tiny_artifacts / "config.json").read_text()) == manifest["config"]
    assert {"torch", "transformers", "scikit-learn"} <= set(manifest["versions"])
    assert set(manifest["data"]["sha256"]) == {"imdb/train", "imdb/test", "imdb/unsup", "sst2/train", "sst2/validation"}
    for stage in ("tokenizer", "lm", "generator", "classifier", "baseline", "eval-classifier", "eval-generator"):
        assert manifest["stages"][stage]["seconds"] >= 0
    for model in ("lm", "generator"):
        info = manifest["models"][model]
        assert math.isfinite(info["first_loss"]) and math.isfinite(info["last_loss"])
        assert math.isfinite(info["val_loss"])
    assert all(math.isfinite(e["train_loss"]) for e in manifest["models"]["classifier"]["epochs"])


def test_samples_report_carries_both_scores(tiny_artifacts):
    report = json.loads((tiny_artifacts / "reports/generator/generator.json").read_text())
    assert report["samples"]["this_movie"]["n"] == 4 and report["samples"]["n"] == 8
    table = (tiny_artifacts / "reports/generator/samples.md").read_text()
    assert table.count("| this_movie | This movie |") == 4
    assert "| set | prompt | review | classifier | judge |" in table


@pytest.mark.slow
def test_rerun_skips_up_to_date_stages_and_force_reruns(tiny_data_dir, tmp_path, caplog):
    out = tmp_path / "a"
    stages = "tokenizer,lm,baseline"
    assert main(tiny_args(tiny_data_dir, out, "--stages", stages)) == 0
    first = json.loads((out / "lm/stage.json").read_text())
    caplog.clear()
    assert main(tiny_args(tiny_data_dir, out, "--stages", stages)) == 0
    assert caplog.text.count("up to date") == 3
    assert json.loads((out / "lm/stage.json").read_text()) == first
    # A changed config value reruns that stage (and only what depends on it).
    caplog.clear()
    assert main(tiny_args(tiny_data_dir, out, "--stages", stages, "--set", "lm.steps=3")) == 0
    assert "stage lm              inputs or config changed" in caplog.text
    assert "stage baseline        up to date" in caplog.text
    caplog.clear()
    assert main(tiny_args(tiny_data_dir, out, "--stages", "baseline", "--force")) == 0
    assert "stage baseline        starts" in caplog.text


def test_max_minutes_cuts_the_training_steps(tiny_data_dir, tmp_path, caplog):
    """A time limit no machine meets: each training loop keeps its probe steps, records the cut, and
    its model is saved and loads as usual."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = tmp_path / "limited"
    assert main(tiny_args(tiny_data_dir, out, "--stages", "tokenizer,lm,classifier", "--set", "lm.steps=40",
                          "--set", "lm.max_minutes=1e-6", "--set", "classifier.max_minutes=1e-6")) == 0
    models = A.read_manifest(out)["models"]
    assert (models["lm"]["steps"], models["lm"]["planned_steps"]) == (11, 40)  # 10 probe steps after the first
    assert models["classifier"]["planned_steps"] > 11 and models["classifier"]["steps"] == 11
    assert "lm: the 40 planned steps would take" in caplog.text and "(lm.max_minutes): training 11 steps" in caplog.text
    AutoModelForCausalLM.from_pretrained(out / "lm")
    AutoModelForSequenceClassification.from_pretrained(out / "classifier")
    from training.summary import summary

    assert "| 11 of 40 (time limit) |" in summary(str(out))


def test_stage_alone_needs_its_inputs(tiny_data_dir, tmp_path, caplog):
    assert main(tiny_args(tiny_data_dir, tmp_path / "b", "--stages", "generator")) == 2
    assert "needs the output of stage 'lm'" in caplog.text


@pytest.mark.slow
def test_failed_stage_leaves_earlier_outputs_intact(tiny_data_dir, tmp_path, monkeypatch):
    out = tmp_path / "c"
    assert main(tiny_args(tiny_data_dir, out, "--stages", "tokenizer,lm")) == 0
    before = (out / "lm/model.safetensors").read_bytes()

    import dataclasses

    from training.stages import STAGES

    def boom(p, tmp):
        (tmp / "partial.bin").write_bytes(b"x")
        raise RuntimeError("simulated crash")

    monkeypatch.setitem(STAGES, "lm", dataclasses.replace(STAGES["lm"], run=boom))
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(tiny_args(tiny_data_dir, out, "--stages", "lm", "--force"))
    assert (out / "lm/model.safetensors").read_bytes() == before
    assert not (out / ".lm.tmp").exists() and not (out / "lm/partial.bin").exists()


def test_training_changes_every_trainable_parameter_and_losses_are_finite():
    from transformers import GPT2Config, GPT2LMHeadModel

    from training.lm import train_lm

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    blocks = torch.randint(0, 50, (8, 16))
    result = train_lm(model, blocks, steps=5, batch_size=4, lr=1e-2, warmup=1, weight_decay=0.1, seed=0, stage="t")
    assert math.isfinite(result.first_loss) and math.isfinite(result.last_loss)
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged


@pytest.mark.slow
def test_classifier_training_changes_parameters_and_learns(tiny_data_dir, tiny_artifacts):
    from training.classifier import build_classifier, predict_proba, train_classifier
    from training.config import load_config
    from training.data import load_split

    cfg = load_config("tiny", TINY_OVERRIDES + ["classifier.epochs=3", "classifier.lr=1e-2"]).classifier
    torch.manual_seed(0)
    model, tok = build_classifier(cfg, tiny_artifacts / "tokenizer", tiny_artifacts / "lm")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train = load_split(tiny_data_dir, "imdb", "train", 0)
    result = train_classifier(model, tok, cfg, train.texts, train.labels,
                              {"imdb": (train.texts[:40], train.labels[:40])}, 0)
    assert all(math.isfinite(e["train_loss"]) for e in result.epochs)
    assert not [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    p = predict_proba(model, tok, train.texts, cfg.max_length)
    assert np.mean((p >= 0.5) == (train.labels == 1)) > 0.8  # sentiment words make this easy


def test_nan_loss_stops_training_with_a_clear_error():
    from training.optim import TrainingError, check_finite

    with pytest.raises(TrainingError, match=r"lm: loss became nan at step 3; lower lm.lr"):
        check_finite(torch.tensor(float("nan")), "lm", 3)


def test_summary_prints_headline_metrics_and_stage_times(tiny_artifacts, capsys):
    from training.summary import main as summary_main

    assert summary_main([str(tiny_artifacts)]) == 0
    out = capsys.readouterr().out
    metrics = A.flatten(A.read_manifest(tiny_artifacts)["metrics"])
    assert f"| classifier accuracy, IMDB test | {metrics['classifier.imdb_test.accuracy']:.4f} |" in out
    assert "| eval-generator |" in out and "**total**" in out


@pytest.mark.slow
def test_classifier_with_its_own_vocabulary(tiny_data_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "own-vocab"
    assert main(tiny_args(tiny_data_dir, out, "--stages", "classifier", "--set", "classifier.vocab_size=320")) == 0
    tok = AutoTokenizer.from_pretrained(out / "classifier")
    assert len(tok) == 320 and not (out / "classifier/bpe").exists()
    assert not (out / "tokenizer").exists()  # it did not need the pipeline tokenizer
    assert tok("great movie")["input_ids"][-1] == tok.eos_token_id
    assert A.read_manifest(out)["models"]["classifier"]["vocab_size"] == 320


def test_stage_table_is_consistent():
    """One row per stage: its inputs come before it, its outputs are its own, its config paths exist."""
    from training.config import load_config
    from training.stages import STAGES

    names = list(STAGES)
    assert len({stage.output for stage in STAGES.values()}) == len(STAGES)
    for preset in ("tiny", "cpu", "gpu"):
        cfg = load_config(preset, [])
        for i, (name, stage) in enumerate(STAGES.items()):
            assert stage.name == name
            assert set(stage.inputs_for(cfg)) <= set(names[:i]), name
            assert {"seed", "data"} | set(stage.config) == set(stage.config_for(cfg)), name

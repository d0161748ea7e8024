"""The path users with the hub take (`--generator-from gpt2 --classifier-from distilbert-base-uncased`),
exercised with tiny models of the same classes saved to local folders."""

import math

import pytest

from glowing import artifacts as A
from support import NEGATIVE, NEUTRAL, POSITIVE, tiny_args
from training.__main__ import main


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory):
    """Like the hub's gpt2: GPT2TokenizerFast with <|endoftext|> as bos/eos/unk and no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(POSITIVE + NEGATIVE + NEUTRAL)] * 20, trainer)
    fast = GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>")
    assert fast.pad_token is None
    path = tmp_path_factory.mktemp("gpt2-like")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(fast), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                               bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id)).save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_distilbert_dir(tmp_path_factory):
    """Like distilbert-base-uncased: a DistilBERT body with a WordPiece tokenizer."""
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizerFast

    path = tmp_path_factory.mktemp("distilbert-like")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "<", ">", "/", "br"]
    vocab += sorted(set(POSITIVE + NEGATIVE + NEUTRAL))
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = DistilBertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    DistilBertModel(DistilBertConfig(vocab_size=len(vocab), dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                                     max_position_embeddings=64, pad_token_id=0)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.slow
def test_pipeline_from_pretrained_local_models(tiny_data_dir, tiny_gpt2_dir, tiny_distilbert_dir, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "pretrained"
    assert main(tiny_args(tiny_data_dir, out, "--generator-from", str(tiny_gpt2_dir),
                          "--classifier-from", str(tiny_distilbert_dir))) == 0
    manifest = A.read_manifest(out)
    assert manifest["config"]["lm"]["init"] == str(tiny_gpt2_dir)
    assert manifest["models"]["tokenizer"]["source"] == str(tiny_gpt2_dir)
    assert manifest["models"]["classifier"]["architecture"] == "DistilBertForSequenceClassification"
    # The tokenizers travel with the models: GPT-2's byte-level BPE, DistilBERT's WordPiece.
    assert AutoTokenizer.from_pretrained(out / "generator").pad_token == "<|endoftext|>"
    assert (out / "classifier/vocab.txt").exists()
    metrics = A.flatten(manifest["metrics"])
    for key in ("classifier.imdb_test.accuracy", "generator.positive_test.perplexity",
                "generator.samples.judge_mean_p_positive"):
        assert math.isfinite(metrics[key]), key


def test_unreachable_pretrained_model_fails_clearly(tiny_data_dir, tmp_path, caplog):
    args = ["--preset", "tiny", "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "x"),
            "--generator-from", str(tmp_path / "no-such-model"), "--stages", "tokenizer"]
    with pytest.raises(RuntimeError, match="could not load a tokenizer from .*no-such-model"):
        main(args)

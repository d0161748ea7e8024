"""The rl and eval-rl stages on tiny models: learning, KL, outputs, bad configurations."""

import json
import math
import shutil

import pytest
import torch

from glowing import artifacts as A
from support import tiny_args
from training.__main__ import main
from training.config import ConfigError, RLConfig, load_config

RL_OVERRIDES = ["rl.steps=3", "rl.batch_size=8", "rl.num_generations=4", "rl.max_new_tokens=8", "rl.queries=16",
                "rl.lr=1e-3"]


def _args(data, out, *extra):
    return tiny_args(data, out, *extra, overrides=RL_OVERRIDES)


@pytest.fixture(scope="module")
def rl_artifacts(tiny_artifacts, tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rl") / "artifacts"
    shutil.copytree(tiny_artifacts, out)
    assert main(_args(tiny_data_dir, out, "--stages", "rl,eval-rl")) == 0
    return out


@pytest.mark.slow
def test_rl_writes_a_generator_and_a_side_by_side_report(rl_artifacts):
    for rel in ["rl/model.safetensors", "rl/config.json", "rl/tokenizer.json", "rl/generation_config.json",
                "rl/history.json", "rl/stage.json", "reports/rl/rl.md", "reports/rl/rl.json",
                "reports/rl/samples.md", "reports/rl/reward_curve.png", "reports/rl/stage.json"]:
        assert (rl_artifacts / rel).stat().st_size > 0, rel
    assert not (rl_artifacts / "rl/trainer").exists()
    assert (rl_artifacts / "reports/rl/reward_curve.png").read_bytes()[:4] == b"\x89PNG"
    metrics = A.flatten(A.read_manifest(rl_artifacts)["metrics"]["rl"])
    for side in ("finetuned", "tuned"):
        for key in ("judge_mean_p_positive", "mean_p_positive", "distinct_2", "mean_reward",
                    "perplexity_under_finetuned", "kl_to_finetuned", "this_movie.judge_mean_p_positive"):
            assert math.isfinite(metrics[f"{side}.{key}"]), f"{side}.{key}"
    assert metrics["finetuned.kl_to_finetuned"] == pytest.approx(0.0, abs=1e-5)  # the reference against itself
    assert metrics["tuned.kl_to_finetuned"] > 0
    assert "targets.judge_at_least_0.9.met" in metrics
    report = (rl_artifacts / "reports/rl/rl.md").read_text()
    assert "| query | response before | response after | reward before | reward after |" in report
    assert (rl_artifacts / "reports/rl/samples.md").read_text().count("| test_prefixes |") == 4
    history = json.loads((rl_artifacts / "rl/history.json").read_text())
    assert [row["step"] for row in history] == [1, 2, 3]
    assert A.read_manifest(rl_artifacts)["models"]["rl"]["steps"] == 3


@pytest.mark.slow
def test_rl_changes_every_trainable_parameter(rl_artifacts):
    from safetensors.torch import load_file

    before = load_file(rl_artifacts / "generator/model.safetensors")
    after = load_file(rl_artifacts / "rl/model.safetensors")
    assert before.keys() == after.keys()
    unchanged = [name for name in before if not name.endswith(".attn.bias") and torch.equal(before[name], after[name])]
    assert not unchanged


@pytest.mark.slow
def test_the_tuned_generator_loads_with_the_runtime(rl_artifacts):
    from glowing.runtime import SamplingSettings, load_generator

    gen = load_generator(rl_artifacts / "rl", backend="torch", device="cpu")
    out = gen.generate(["This movie"], SamplingSettings(max_new_tokens=6, temperature=0.9, top_k=50, top_p=0.95,
                                                        seed=1))
    assert len(out) == 1 and isinstance(out[0], str)


@pytest.mark.slow
def test_reward_rises_on_a_trivially_learnable_reward(tiny_artifacts):
    """Reward = share of response tokens from a fixed half of the vocabulary (about 0.5 at the
    start, so every group holds a signal): GRPO must learn to prefer those tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.rl import tune

    tok = AutoTokenizer.from_pretrained(tiny_artifacts / "generator")
    chosen = set(range(0, len(tok), 2))
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_artifacts / "generator")

    def share_of_chosen(prompts, completions, completion_ids, **_):
        return [sum(t in chosen for t in ids) / max(1, len(ids)) for ids in completion_ids]

    cfg = RLConfig(steps=16, batch_size=16, num_generations=8, lr=2e-2, warmup_steps=0, kl_coef=0.01,
                   max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0)
    result = tune(policy, tok, share_of_chosen, ["This movie", "The film", "I", "It was"] * 8, cfg,
                  tiny_artifacts.parent / "grpo-toy", seed=0)
    rewards = result.curve("reward")
    assert len(rewards) == 16
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.15, rewards


def _hand_kl(policy, reference, ids: list[int], prompt_len: int) -> float:
    """sum over response positions t of log pi(x_t | x_<t) - log ref(x_t | x_<t), one unpadded row."""
    x = torch.tensor([ids])
    total = 0.0
    with torch.no_grad():
        lp = torch.log_softmax(policy(x).logits[0], -1)
        lr = torch.log_softmax(reference(x).logits[0], -1)
    for t in range(prompt_len, len(ids)):
        total += float(lp[t - 1, ids[t]] - lr[t - 1, ids[t]])
    return total


def test_kl_matches_a_hand_computation_with_left_padding():
    from transformers import GPT2Config, GPT2LMHeadModel

    from training.rl import kl_to_reference

    config = GPT2Config(vocab_size=30, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    policy, reference = GPT2LMHeadModel(config).eval(), GPT2LMHeadModel(config).eval()
    short, long_ = [3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14]  # prompts of 2 and 4 tokens, responses of 3
    pad = 0
    input_ids = torch.tensor([[pad, pad] + short, long_])
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    response = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]])
    kl = kl_to_reference(policy, reference, input_ids, attention, response)
    assert kl[0].item() == pytest.approx(_hand_kl(policy, reference, short, 2), abs=1e-5)
    assert kl[1].item() == pytest.approx(_hand_kl(policy, reference, long_, 4), abs=1e-5)
    assert kl_to_reference(policy, policy, input_ids, attention, response).abs().max().item() < 1e-6


def test_repetition_term_of_the_reward():
    from training.rl import ClassifierReward, batch_novelty, repeated_bigram_share

    assert repeated_bigram_share("a great film") == 0.0
    assert repeated_bigram_share("A great movie, a great movie") == pytest.approx(1 - 4 / 5)  # "a great" twice
    assert repeated_bigram_share("great") == 0.0

    class Fixed(ClassifierReward):
        def score(self, texts):
            import numpy as np

            return np.ones(len(texts))

    reward = Fixed(torch.nn.Linear(1, 1), None, 8, "logit", "<|endoftext|>", repetition_penalty=2.0)
    assert reward(["<|endoftext|>It", "<|endoftext|>It"], [" is good", " is a a a a"]) == \
        pytest.approx([1.0, 1.0 - 2.0 * (1 - 2 / 4)])
    assert reward.texts(["<|endoftext|>It"], [" is good"]) == ["It is good"]
    assert batch_novelty(["a great movie", "a great film", "so bad"]) == [0.5, 0.5, 1.0]
    assert batch_novelty(["same words", "same words"]) == [0.0, 0.0]
    novel = Fixed(torch.nn.Linear(1, 1), None, 8, "logit", "", novelty_bonus=3.0)
    assert novel(["", "", ""], ["a great movie", "a great film", "so bad"]) == pytest.approx([2.5, 2.5, 4.0])


@pytest.mark.parametrize("override, flag", [
    ("rl.query_min_tokens=9", "rl.query_min_tokens"),  # min > max (8)
    ("rl.kl_coef=-0.1", "rl.kl_coef"),
    ("rl.batch_size=6", "rl.batch_size"),  # not a multiple of num_generations (4 in tiny)
    ("rl.num_generations=1", "rl.num_generations"),
    ('rl.reward="accuracy"', "rl.reward"),
    ("rl.max_new_tokens=200", "rl.max_new_tokens"),  # past the tiny generator's 128 positions
    ("rl.steps=0", "rl.steps"),
    ("rl.repetition_penalty=-1", "rl.repetition_penalty"),
    ("rl.novelty_bonus=-1", "rl.novelty_bonus"),
    ('rl.scale_rewards="sometimes"', "rl.scale_rewards"),
])
def test_bad_rl_config_is_refused_naming_the_flag(override, flag):
    with pytest.raises(ConfigError, match=rf"{flag} .*--set {flag}=VALUE"):
        load_config("tiny", [override])


def test_rl_without_a_generator_fails_clearly(tiny_data_dir, tmp_path, caplog):
    assert main(_args(tiny_data_dir, tmp_path / "empty", "--stages", "rl")) == 2
    assert "stage 'rl' needs the output of stage 'generator'" in caplog.text
    assert not (tmp_path / "empty/rl").exists()


def test_all_leaves_out_the_optional_rl_stages(tiny_artifacts):
    manifest = A.read_manifest(tiny_artifacts)  # built with the default --stages all
    assert "eval-generator" in manifest["stages"] and "rl" not in manifest["stages"]
    assert not (tiny_artifacts / "rl").exists() and not (tiny_artifacts / "reports/rl").exists()


def test_export_records_the_finetuned_generator_by_default(exported):
    served = A.read_manifest(exported)["onnx"]["generator"]
    assert served["choice"] == "finetuned" and served["dir"] == "generator"
    assert served["trained"] == A.read_manifest(exported)["models"]["generator"]["source"]


@pytest.mark.slow
def test_export_of_the_rl_generator(rl_artifacts, export_data_dir, tmp_path, caplog):
    from export.__main__ import main as export_main
    from glowing.runtime import SamplingSettings, load_generator

    root = tmp_path / "artifacts"
    shutil.copytree(rl_artifacts, root)
    args = ["--artifacts", str(root), "--data-dir", str(export_data_dir), "--int8-sample", "200",
            "--parity-sample", "16", "--gen-prompts", "4", "--gen-tokens", "8", "--generator", "rl"]
    assert export_main(args) == 0
    served = A.read_manifest(root)["onnx"]["generator"]
    assert served == {"choice": "rl", "dir": "rl", "trained": A.read_manifest(root)["models"]["rl"]["source"],
                      "fingerprint": A.read_manifest(root)["stages"]["rl"]["fingerprint"]}
    greedy = SamplingSettings(max_new_tokens=8, temperature=0.0, top_k=0, top_p=1.0, seed=0)
    onnx_ids = load_generator(root / "onnx/generator", "onnx", "cpu").generate_ids(["This movie"], greedy)
    assert onnx_ids == load_generator(root / "rl", "torch", "cpu").generate_ids(["This movie"], greedy)
    # Without an rl/ folder the same command stops before writing anything, naming the stage to run.
    shutil.rmtree(root / "rl")
    caplog.clear()
    assert export_main(args) == 2
    assert "--stages rl" in caplog.text


@pytest.mark.slow
def test_rl_never_reads_imdb_test(tiny_artifacts, tiny_data_dir, tmp_path, loaded_splits):
    """The queries are IMDB *train* openings: only eval-rl may load the test split."""
    out = tmp_path / "artifacts"
    shutil.copytree(tiny_artifacts, out)
    assert main(_args(tiny_data_dir, out, "--stages", "rl", "--set", "rl.steps=1")) == 0
    assert "imdb/train" in loaded_splits and "imdb/test" not in loaded_splits

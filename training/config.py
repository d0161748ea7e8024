"""Typed pipeline configuration: presets are short TOML files, any value overridable.

    cfg = load_config("cpu", overrides=["lm.n_layer=4", "classifier.epochs=2"])

Errors name the preset, the key or the ``--set`` flag at fault.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent / "presets"
SCRATCH = "scratch"


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    val_fraction: float = 0.1  # share of IMDB train held out for validation and early stopping
    max_train: int = 0  # cap on IMDB train reviews used (0 = all); smoke runs only
    max_unsup: int = 0  # cap on IMDB unsup reviews used for LM pretraining (0 = all)
    max_test: int = 0  # cap on IMDB test reviews evaluated (0 = all 25,000); smoke runs only
    # SST-2 validation is never trained or tuned on: SST-2 train rows are held out in its place
    # (training/data.py, sst2_holdout_split), with their sub-phrases removed from training.
    sst2_holdout: int = 800  # SST-2 train rows held out (about the validation set's 872)
    sst2_holdout_min_words: int = 10  # held-out rows have at least this many words (whole sentences, mostly)

    def validate(self) -> None:
        _check(0.0 < self.val_fraction < 0.5, "data.val_fraction", "must be in (0, 0.5)")
        _check(self.sst2_holdout >= 1, "data.sst2_holdout", "must be >= 1")
        _check(self.sst2_holdout_min_words >= 1, "data.sst2_holdout_min_words", "must be >= 1")
        for name in ("max_train", "max_unsup", "max_test"):
            _check(getattr(self, name) >= 0, f"data.{name}", "must be >= 0 (0 means all)")


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192  # byte-level BPE vocabulary, special tokens included
    min_frequency: int = 2  # a merge must occur this often
    max_texts: int = 0  # reviews used to learn merges (0 = all of train+unsup)

    def validate(self) -> None:
        _check(self.vocab_size >= 300, "tokenizer.vocab_size", "must be >= 300 (256 bytes + merges)")
        _check(self.min_frequency >= 1, "tokenizer.min_frequency", "must be >= 1")


@dataclass
class LMConfig:
    init: str = SCRATCH  # "scratch" to pretrain on IMDB, or a hub id / local dir (e.g. "gpt2")
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 512  # longest context the model (and the service) can use
    block_size: int = 256  # training sequence length
    batch_size: int = 16
    steps: int = 300  # optimizer steps of pretraining (0 = keep the initial weights)
    lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    dropout: float = 0.0
    # Wall-clock limit of the training loop, in minutes (0 = none): past it, the steps are cut
    # (training/optim.py TimeLimit); what keeps the cpu preset in its budget on a slower machine.
    max_minutes: float = 0.0

    def validate(self) -> None:
        _validate_model("lm", self)
        _check(self.max_minutes >= 0, "lm.max_minutes", "must be >= 0 (0: no limit)")
        _check(self.block_size <= self.n_positions, "lm.block_size", "must be <= lm.n_positions")
        _check(self.steps >= 0, "lm.steps", "must be >= 0")


@dataclass
class GeneratorConfig:
    block_size: int = 256
    batch_size: int = 16
    steps: int = 200  # fine-tuning steps on positive training reviews
    lr: float = 5e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    # Wall-clock limit of the training loop, in minutes (0 = none): past it, the steps are cut
    # (training/optim.py TimeLimit); what keeps the cpu preset in its budget on a slower machine.
    max_minutes: float = 0.0

    def validate(self) -> None:
        _check(self.max_minutes >= 0, "generator.max_minutes", "must be >= 0 (0: no limit)")
        _check(self.block_size >= 8, "generator.block_size", "must be >= 8")
        _check(self.batch_size >= 1, "generator.batch_size", "must be >= 1")
        _check(self.steps >= 1, "generator.steps", "must be >= 1")
        _check(self.lr > 0, "generator.lr", "must be > 0")


@dataclass
class ClassifierConfig:
    init: str = SCRATCH  # "scratch", "lm" (ULMFiT: start from the LM body) or a hub id / local dir
    # With init = "scratch": 0 shares the pipeline's tokenizer; N > 0 trains the classifier its own
    # byte-level BPE of N tokens on IMDB train+unsup (whole words help a shallow classifier).
    vocab_size: int = 0
    n_layer: int = 2  # architecture when init = "scratch" (a GPT-2 shape)
    n_embd: int = 128
    n_head: int = 4
    dropout: float = 0.1
    max_length: int = 512  # tokens per review; longer reviews are truncated
    batch_size: int = 32
    epochs: int = 2
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    # The mix: every IMDB training review once per epoch, plus SST-2 train phrases.
    sst2_repeats: float = 0.0  # passes over SST-2 train[fit] per epoch (0 = IMDB only; 0.5 = a random half)
    sst2_balance: bool = True  # as many negative as positive SST-2 phrases per epoch (train is 55.8% positive)
    # Batches are drawn from one length bucket at a time (upper bounds in tokens; the last bucket
    # runs to max_length), so a 10-token phrase is never padded to a 512-token review.
    length_buckets: list = field(default_factory=lambda: [32, 128, 256])
    # Texts per batch in each bucket, one more entry than length_buckets (the last: the open bucket);
    # short phrases go in bigger batches (a step's fixed cost is then shared). Empty: batch_size everywhere.
    bucket_batch_sizes: list = field(default_factory=list)
    # With its own vocabulary (vocab_size > 0): "lower+ptb" lower-cases, joins PTB-split contractions
    # ("it 's" -> "it's") and strips, inside the saved tokenizer, so SST-2's lower-cased, tokenised
    # phrases and users' texts meet the same tokens at training and serving time; "none" leaves texts as they are.
    normalizer: str = "none"
    # Wall-clock limit of the training loop, in minutes (0 = none): past it, the steps are cut
    # (training/optim.py TimeLimit); what keeps the cpu preset in its budget on a slower machine.
    max_minutes: float = 0.0

    def validate(self) -> None:
        _check(self.max_minutes >= 0, "classifier.max_minutes", "must be >= 0 (0: no limit)")
        if self.init == SCRATCH:
            _validate_model("classifier", self)
        _check(self.sst2_repeats >= 0, "classifier.sst2_repeats", "must be >= 0 (0 trains on IMDB only)")
        _check(all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in self.length_buckets)
               and self.length_buckets == sorted(set(self.length_buckets)), "classifier.length_buckets",
               "must be increasing positive integers (token counts), e.g. [32, 128, 256]")
        _check(not self.bucket_batch_sizes or (
            len(self.bucket_batch_sizes) == len(self.length_buckets) + 1
            and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in self.bucket_batch_sizes)),
            "classifier.bucket_batch_sizes", "must be empty or hold one positive integer per bucket "
            "(len(classifier.length_buckets) + 1)")
        _check(self.normalizer in ("none", "lower+ptb"), "classifier.normalizer", 'must be "none" or "lower+ptb"')
        _check(self.normalizer == "none" or (self.vocab_size > 0 and self.init == SCRATCH), "classifier.normalizer",
               'can only be "lower+ptb" with classifier.vocab_size > 0 (the classifier\'s own tokenizer)')
        _check(self.vocab_size == 0 or (self.vocab_size >= 300 and self.init == SCRATCH), "classifier.vocab_size",
               "must be 0, or >= 300 with classifier.init = \"scratch\"")
        _check(self.max_length >= 8, "classifier.max_length", "must be >= 8")
        _check(self.batch_size >= 1, "classifier.batch_size", "must be >= 1")
        _check(self.epochs >= 1, "classifier.epochs", "must be >= 1")
        _check(self.lr > 0, "classifier.lr", "must be > 0")


@dataclass
class BaselineConfig:
    ngram_max: int = 2  # word n-grams 1..ngram_max
    min_df: int = 2
    max_features: int = 0  # 0 = no cap
    C: float = 4.0  # inverse regularisation strength of the logistic regression

    def validate(self) -> None:
        _check(self.ngram_max >= 1, "baseline.ngram_max", "must be >= 1")
        _check(self.C > 0, "baseline.C", "must be > 0")


@dataclass
class EvalConfig:
    batch_size: int = 64  # scoring batch
    ppl_reviews: int = 1000  # positive IMDB test reviews for perplexity (0 = all 12,500)
    n_samples: int = 100  # generated reviews per prompt set
    prompt: str = "This movie"
    prefix_min_tokens: int = 2
    prefix_max_tokens: int = 8
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.95
    gen_batch_size: int = 50

    def validate(self) -> None:
        _check(self.n_samples >= 1, "eval.n_samples", "must be >= 1")
        _check(1 <= self.prefix_min_tokens <= self.prefix_max_tokens, "eval.prefix_min_tokens",
               "must be >= 1 and <= eval.prefix_max_tokens")
        _check(self.max_new_tokens >= 1, "eval.max_new_tokens", "must be >= 1")
        _check(self.temperature > 0, "eval.temperature", "must be > 0")
        _check(0 < self.top_p <= 1, "eval.top_p", "must be in (0, 1]")
        _check(self.top_k >= 0, "eval.top_k", "must be >= 0 (0 disables top-k)")


@dataclass
class RLConfig:
    """Stage ``rl``: GRPO on the fine-tuned generator, the classifier as reward (training/rl.py)."""

    steps: int = 100  # optimizer steps; each samples batch_size responses
    batch_size: int = 32  # responses per step: batch_size / num_generations queries
    num_generations: int = 8  # responses per query; a response's advantage is relative to its group
    lr: float = 2e-5
    warmup_steps: int = 5
    kl_coef: float = 0.05  # weight of the KL penalty toward the fine-tuned generator (TRL's beta)
    epochs_per_batch: int = 1  # optimizer passes over each sampled batch (TRL's num_iterations)
    reward: str = "logit"  # "logit" (the classifier's positive log-odds) or "p" (its P(positive))
    repetition_penalty: float = 0.0  # minus this x the share of repeated word bigrams in a response
    novelty_bonus: float = 0.0  # plus this x the share of a response's bigrams no other response of the batch uses
    scale_rewards: str = "batch"  # advantages divided by the reward std of the "group", the "batch", or "none"
    queries: int = 2000  # IMDB train review openings sampled as queries
    query_min_tokens: int = 2
    query_max_tokens: int = 8
    max_new_tokens: int = 64  # response length while tuning and in eval-rl's samples
    temperature: float = 1.0  # sampling while tuning and in eval-rl, for both generators (the service default)
    top_k: int = 50
    top_p: float = 0.95

    def validate(self) -> None:
        _check(self.steps >= 1, "rl.steps", "must be >= 1")
        _check(self.num_generations >= 2, "rl.num_generations",
               "must be >= 2 (GRPO compares responses to the same query)")
        _check(self.batch_size >= self.num_generations and self.batch_size % self.num_generations == 0,
               "rl.batch_size", "must be a multiple of rl.num_generations")
        _check(self.lr > 0, "rl.lr", "must be > 0")
        _check(self.warmup_steps >= 0, "rl.warmup_steps", "must be >= 0")
        _check(self.kl_coef >= 0, "rl.kl_coef", "must be >= 0 (0 turns the KL penalty off)")
        _check(self.epochs_per_batch >= 1, "rl.epochs_per_batch", "must be >= 1")
        _check(self.reward in ("logit", "p"), "rl.reward", 'must be "logit" or "p"')
        _check(self.repetition_penalty >= 0, "rl.repetition_penalty", "must be >= 0 (0 turns it off)")
        _check(self.novelty_bonus >= 0, "rl.novelty_bonus", "must be >= 0 (0 turns it off)")
        _check(self.scale_rewards in ("group", "batch", "none"), "rl.scale_rewards",
               'must be "group", "batch" or "none"')
        _check(1 <= self.query_min_tokens <= self.query_max_tokens, "rl.query_min_tokens",
               "must be >= 1 and <= rl.query_max_tokens")
        _check(self.queries >= self.batch_size // self.num_generations, "rl.queries",
               "must be >= rl.batch_size / rl.num_generations")
        _check(self.max_new_tokens >= 1, "rl.max_new_tokens", "must be >= 1")
        _check(self.temperature > 0, "rl.temperature", "must be > 0")
        _check(0 < self.top_p <= 1, "rl.top_p", "must be in (0, 1]")
        _check(self.top_k >= 0, "rl.top_k", "must be >= 0 (0 disables top-k)")


@dataclass
class Config:
    preset: str = "cpu"
    seed: int = 1337
    threads: int = 0  # torch intra-op threads (0 = torch's default: all cores)
    device: str = "auto"  # "auto" (CUDA when torch sees a GPU), "cpu" or "cuda"
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def validate(self) -> Config:
        for section in SECTIONS:
            getattr(self, section).validate()
        _check(self.device in ("auto", "cpu", "cuda"), "device", 'must be "auto", "cpu" or "cuda"')
        _check(self.lm.n_positions >= self.generator.block_size, "generator.block_size",
               "must be <= lm.n_positions")
        _check(self.rl.query_max_tokens + self.rl.max_new_tokens < self.lm.n_positions, "rl.max_new_tokens",
               "plus rl.query_max_tokens must be < lm.n_positions (the generator's context)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = ("data", "tokenizer", "lm", "generator", "classifier", "baseline", "eval", "rl")


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key} {message} (set it with --set {key}=VALUE)")


def _validate_model(section: str, cfg: Any) -> None:
    _check(cfg.n_layer >= 1, f"{section}.n_layer", "must be >= 1")
    _check(cfg.n_head >= 1, f"{section}.n_head", "must be >= 1")
    _check(cfg.n_embd % cfg.n_head == 0, f"{section}.n_embd", f"must be divisible by {section}.n_head")
    _check(0.0 <= cfg.dropout < 1.0, f"{section}.dropout", "must be in [0, 1)")


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_config(preset: str, overrides: list[str] | None = None) -> Config:
    """A preset name (or a path to a TOML file), then ``section.key=value`` overrides."""
    path = Path(preset)
    if not (path.suffix == ".toml" and path.exists()):
        path = PRESET_DIR / f"{preset}.toml"
        if not path.exists():
            raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(available_presets())} "
                              "or give the path of a .toml file")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML ({err})") from err
    cfg = Config(preset=path.stem)
    _apply(cfg, raw, origin=str(path))
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set lm.n_layer=4")
        _set(cfg, key.strip(), _parse_value(value.strip()), origin=f"--set {item}")
    return cfg.validate()


def _apply(cfg: Config, raw: dict[str, Any], origin: str) -> None:
    for key, value in raw.items():
        if isinstance(value, dict):
            for sub, subvalue in value.items():
                _set(cfg, f"{key}.{sub}", subvalue, origin)
        else:
            _set(cfg, key, value, origin)


def _set(cfg: Config, dotted: str, value: Any, origin: str) -> None:
    parts = dotted.split(".")
    target: Any = cfg
    for part in parts[:-1]:
        if part not in SECTIONS or target is not cfg:
            raise ConfigError(f"{origin}: unknown config section {part!r} in {dotted!r} "
                              f"(sections: {', '.join(SECTIONS)})")
        target = getattr(target, part)
    name = parts[-1]
    fields = {f.name: f for f in dataclasses.fields(target)}
    if name not in fields or (target is cfg and name in SECTIONS) or (target is cfg and name == "preset"):
        where = f"section {parts[-2]!r}" if len(parts) > 1 else "the top level"
        known = ", ".join(n for n in fields if n not in SECTIONS and n != "preset")
        raise ConfigError(f"{origin}: unknown config key {dotted!r} in {where} (known: {known})")
    expected = type(getattr(target, name))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not expected:
        raise ConfigError(f"{origin}: {dotted} must be a {expected.__name__}, got {value!r}")
    setattr(target, name, value)


def _parse_value(text: str) -> Any:
    """TOML literal syntax (``4``, ``1e-3``, ``true``, ``"gpt2"``); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text

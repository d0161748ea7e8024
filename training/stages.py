"""The pipeline's stages: one function each, ``stage(pipeline, out_dir) -> manifest patch``, and at
the bottom ``STAGES``, the one table that says, per stage, what it writes, which stages' outputs it
reads, which config values it depends on and which function runs it.

Each function reads its inputs from ``pipeline.out`` (earlier stages) and writes only into ``out_dir``.
``training/pipeline.py`` orders, skips and publishes the stages; this module does not import it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from glowing import artifacts as A
from glowing.runtime.files import MAX_LENGTH_FILE
from training import baseline as baseline_mod
from training import classifier as clf
from training import device as dev
from training import distributed as dist
from training import evaluate as ev
from training import lm as lm_mod
from training import tokenizer as tok_mod
from training.config import SCRATCH, Config
from training.data import Split

log = logging.getLogger(__name__)


class Pipeline(Protocol):
    """What a stage sees of the running pipeline (``training.pipeline.Pipeline``)."""

    cfg: Config
    out: Path
    fit: Split  # IMDB train minus the held-out part
    val: Split  # the held-out part of IMDB train
    unsup: Split
    imdb_test: Split  # evaluation stages only
    sst2_train_val: tuple[Split, Split]  # SST-2 train minus a held-out part, and that part

    def path(self, stage: str) -> Path: ...  # the stage's output folder

    def split(self, key: str) -> Split: ...  # "dataset/split", e.g. "sst2/validation"


def _seed(p: Pipeline, offset: int = 0) -> None:
    torch.manual_seed(p.cfg.seed + offset)
    if p.cfg.threads:
        torch.set_num_threads(p.cfg.threads)


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tokenizer(p: Pipeline, out: Path) -> dict:
    cfg = p.cfg
    if cfg.lm.init != SCRATCH:
        tok = tok_mod.load_pretrained_tokenizer(cfg.lm.init)
        source = cfg.lm.init
    else:
        texts = p.fit.texts + p.unsup.texts
        if cfg.tokenizer.max_texts:
            texts = texts[: cfg.tokenizer.max_texts]
        log.info("training byte-level BPE (vocab %d) on %d reviews", cfg.tokenizer.vocab_size, len(texts))
        tok = tok_mod.train_bpe(texts, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
        source = "imdb train+unsup"
    tok_mod.save(tok, out)
    return {"models": {"tokenizer": {"source": source, "vocab_size": len(tok)}}}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _lm_summary(model, result: lm_mod.TrainResult, val_loss: float, source: str) -> dict:
    return {"source": source, "parameters": sum(x.numel() for x in model.parameters()),
            "n_layer": model.config.n_layer, "n_embd": model.config.n_embd,
            "n_positions": model.config.n_positions, "steps": result.steps, "planned_steps": result.planned_steps,
            "train_tokens": result.tokens,
            "first_loss": result.first_loss, "last_loss": result.last_loss, "val_loss": val_loss,
            "val_perplexity": float(np.exp(val_loss)), "train_seconds": round(result.seconds, 1)}


def lm(p: Pipeline, out: Path) -> dict:
    cfg = p.cfg.lm
    _seed(p)
    tok = _load_tokenizer(p.path("tokenizer"))
    model = lm_mod.build_lm(cfg, tok).to(dev.resolve(p.cfg.device))
    texts = p.fit.texts + p.unsup.texts
    order = np.random.default_rng(p.cfg.seed).permutation(len(texts))
    texts = [texts[i] for i in order]
    budget = cfg.steps * cfg.batch_size * cfg.block_size
    blocks = lm_mod.pack_blocks(tok, texts, cfg.block_size, max_tokens=int(budget * 1.05) + cfg.block_size)
    val_blocks = lm_mod.pack_blocks(tok, p.val.texts, cfg.block_size, max_tokens=64 * cfg.block_size)
    log.info("lm: %s, %.2fM parameters, %d steps x %d x %d tokens (%d distinct blocks)",
             cfg.init, sum(x.numel() for x in model.parameters()) / 1e6, cfg.steps, cfg.batch_size,
             cfg.block_size, len(blocks))
    result = lm_mod.train_lm(model, blocks, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                             warmup=cfg.warmup_steps, weight_decay=cfg.weight_decay, seed=p.cfg.seed, stage="lm",
                             max_minutes=cfg.max_minutes)
    val_loss = lm_mod.mean_loss(model, val_blocks)
    log.info("lm: train loss %s -> %s, held-out loss %.3f", _fmt(result.first_loss), _fmt(result.last_loss), val_loss)
    if dist.is_main():
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return {"models": {"lm": _lm_summary(model, result, val_loss, cfg.init)}}


def generator(p: Pipeline, out: Path) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig

    cfg, ev_cfg = p.cfg.generator, p.cfg.eval
    _seed(p, 1)
    tok = _load_tokenizer(p.path("lm"))
    model = AutoModelForCausalLM.from_pretrained(p.path("lm")).to(dev.resolve(p.cfg.device))
    positives = p.fit.where(1).texts
    val_positives = p.val.where(1).texts
    budget = cfg.steps * cfg.batch_size * cfg.block_size
    blocks = lm_mod.pack_blocks(tok, positives, cfg.block_size, max_tokens=int(budget * 1.05) + cfg.block_size)
    val_blocks = lm_mod.pack_blocks(tok, val_positives, cfg.block_size, max_tokens=64 * cfg.block_size)
    before = lm_mod.mean_loss(model, val_blocks)
    result = lm_mod.train_lm(model, blocks, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                             warmup=cfg.warmup_steps, weight_decay=cfg.weight_decay, seed=p.cfg.seed + 1,
                             stage="generator", max_minutes=cfg.max_minutes)
    val_loss = lm_mod.mean_loss(model, val_blocks)
    log.info("generator: held-out positive loss %.3f -> %.3f", before, val_loss)
    model.generation_config = GenerationConfig(
        do_sample=True, max_new_tokens=ev_cfg.max_new_tokens, temperature=ev_cfg.temperature,
        top_k=ev_cfg.top_k, top_p=ev_cfg.top_p, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    tok.padding_side = "left"
    if dist.is_main():
        model.save_pretrained(out)
        tok.save_pretrained(out)
    summary = _lm_summary(model, result, val_loss, "lm fine-tuned on positive IMDB train reviews")
    summary["val_loss_before"] = before
    return {"models": {"generator": summary}}


def classifier(p: Pipeline, out: Path) -> dict:
    cfg = p.cfg.classifier
    _seed(p, 2)
    tokenizer_dir = p.path("tokenizer")
    sst2_fit, sst2_val = p.sst2_train_val if cfg.sst2_repeats > 0 else (None, None)
    if cfg.vocab_size:
        tokenizer_dir = out / "bpe"
        if dist.is_main():
            log.info("classifier: training its own byte-level BPE (vocab %d, normalizer %s)", cfg.vocab_size,
                     cfg.normalizer)
            texts = p.fit.texts + p.unsup.texts + (sst2_fit.texts if sst2_fit else [])
            tok_mod.save(tok_mod.train_bpe(texts, cfg.vocab_size, p.cfg.tokenizer.min_frequency, cfg.normalizer),
                         tokenizer_dir)
        dist.barrier()  # the other ranks load rank 0's tokenizer: one vocabulary for all
    model, tok = clf.build_classifier(cfg, tokenizer_dir, p.path("lm"))
    model.to(dev.resolve(p.cfg.device))
    n_params = sum(x.numel() for x in model.parameters())
    log.info("classifier: init=%s, %.2fM parameters, %d IMDB training reviews, %s SST-2 phrases, max_length %d",
             cfg.init, n_params / 1e6, len(p.fit), len(sst2_fit) if sst2_fit else "no", cfg.max_length)
    val = {"imdb": (p.val.texts, p.val.labels)}
    if sst2_val is not None:
        val["sst2"] = (sst2_val.texts, sst2_val.labels)
    result = clf.train_classifier(model, tok, cfg, p.fit.texts, p.fit.labels, val, p.cfg.seed,
                                  sst2_fit.texts if sst2_fit else [], sst2_fit.labels if sst2_fit else None)
    if dist.is_main():
        model.save_pretrained(out)
        tok.save_pretrained(out)
        shutil.rmtree(out / "bpe", ignore_errors=True)  # the tokenizer now sits beside the model
        (out / MAX_LENGTH_FILE).write_text(f"{cfg.max_length}\n")
    last = result.epochs[result.best_epoch - 1]
    return {"models": {"classifier": {"source": cfg.init, "vocab_size": len(tok),
                                      "architecture": model.config.architectures[0]
                                      if model.config.architectures else type(model).__name__,
                                      "parameters": n_params, "max_length": cfg.max_length,
                                      "normalizer": cfg.normalizer, "sst2_repeats": cfg.sst2_repeats,
                                      "sst2_train_phrases": len(sst2_fit) if sst2_fit else 0,
                                      "epochs": result.epochs, "best_epoch": result.best_epoch,
                                      "steps": result.steps, "planned_steps": result.planned_steps,
                                      "val_accuracy": result.best_val_accuracy,
                                      **{k: v for k, v in last.items() if k.endswith("_accuracy")},
                                      "train_seconds": round(result.seconds, 1)}}}


def baseline(p: Pipeline, out: Path) -> dict:
    pipe = baseline_mod.train_baseline(p.cfg.baseline, p.fit.texts, p.fit.labels)
    val_acc = float(np.mean((baseline_mod.predict_proba(pipe, p.val.texts) >= 0.5) == (p.val.labels == 1)))
    log.info("baseline: validation accuracy %.4f", val_acc)
    baseline_mod.save(pipe, out / A.BASELINE_FILE)
    return {"models": {"baseline": {"features": len(pipe[0].vocabulary_), "val_accuracy": val_acc}}}


def _load_classifier(p: Pipeline):
    from transformers import AutoModelForSequenceClassification

    path = p.path("classifier")
    model = AutoModelForSequenceClassification.from_pretrained(path).to(dev.resolve(p.cfg.device)).eval()
    tok = _load_tokenizer(path)
    tok.padding_side = "right"
    return model, tok, int((path / MAX_LENGTH_FILE).read_text())


def eval_classifier(p: Pipeline, out: Path) -> dict:
    model, tok, max_length = _load_classifier(p)
    judge = baseline_mod.load(p.path("baseline") / A.BASELINE_FILE)
    report = ev.evaluate_classifier(model, tok, max_length, judge,
                                    {"imdb_test": p.imdb_test, "sst2_validation": p.split("sst2/validation")},
                                    p.cfg.eval.batch_size, out)
    A.write_json_atomic(out / "classifier.json", report)
    headline = {m: {k: {x: v[x] for x in ev.HEADLINE} for k, v in report[m].items()}
                for m in ("classifier", "baseline")}
    return {"metrics": headline}


def eval_generator(p: Pipeline, out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    _seed(p, 3)
    gen = AutoModelForCausalLM.from_pretrained(p.path("generator")).to(dev.resolve(p.cfg.device)).eval()
    gen_tok = _load_tokenizer(p.path("generator"))
    model, tok, max_length = _load_classifier(p)
    judge = baseline_mod.load(p.path("baseline") / A.BASELINE_FILE)
    report = ev.evaluate_generator(gen, gen_tok, model, tok, max_length, judge, p.imdb_test.where(1).texts,
                                   p.imdb_test.texts, p.cfg.eval, p.cfg.seed, out)
    A.write_json_atomic(out / "generator.json", report)
    return {"metrics": {"generator": report}}


def rl(p: Pipeline, out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from training import rl as rl_mod

    cfg = p.cfg.rl
    _seed(p, 4)
    device = dev.resolve(p.cfg.device)
    tok = _load_tokenizer(p.path("generator"))
    policy = AutoModelForCausalLM.from_pretrained(p.path("generator")).to(device)
    model, clf_tok, max_length = _load_classifier(p)
    reward = rl_mod.ClassifierReward(model, clf_tok, max_length, cfg.reward, tok.bos_token, cfg.repetition_penalty,
                                     cfg.novelty_bonus)
    queries = ev.review_openings(tok, p.fit.texts, cfg.queries, cfg.query_min_tokens, cfg.query_max_tokens,
                                 p.cfg.seed + 4, drop_blank=True)
    log.info("rl: GRPO, %d steps x %d responses (%d per query) of up to %d tokens, kl_coef %g, reward %s, "
             "%d training queries", cfg.steps, cfg.batch_size, cfg.num_generations, cfg.max_new_tokens,
             cfg.kl_coef, cfg.reward, len(queries))
    result = rl_mod.tune(policy, tok, reward, queries, cfg, out / "trainer", p.cfg.seed + 4,
                         use_cpu=device.type == "cpu")
    shutil.rmtree(out / "trainer", ignore_errors=True)  # TRL's scratch folder; nothing in it is needed
    policy.eval()
    tok.padding_side = "left"
    policy.save_pretrained(out)  # the generator's generation_config travels with the model
    tok.save_pretrained(out)
    A.write_json_atomic(out / "history.json", result.history)
    rewards = result.curve("reward")
    tail = max(1, len(rewards) // 10)
    log.info("rl: mean reward %.3f (first %d steps) -> %.3f (last %d), %.0f s", float(np.mean(rewards[:tail])),
             tail, float(np.mean(rewards[-tail:])), tail, result.seconds)
    return {"models": {"rl": {"source": "generator tuned by GRPO, classifier reward", "algorithm": "grpo",
                              "reward": cfg.reward, "kl_coef": cfg.kl_coef, "steps": result.steps,
                              "responses": result.steps * cfg.batch_size,
                              "reward_first": float(np.mean(rewards[:tail])),
                              "reward_last": float(np.mean(rewards[-tail:])),
                              "train_seconds": round(result.seconds, 1)}}}


def eval_rl(p: Pipeline, out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from training import evaluate_rl as erl
    from training import rl as rl_mod

    _seed(p, 5)
    device = dev.resolve(p.cfg.device)
    generators = {name: AutoModelForCausalLM.from_pretrained(p.path(stage)).to(device).eval()
                  for name, stage in (("finetuned", "generator"), ("tuned", "rl"))}
    tok = _load_tokenizer(p.path("generator"))
    model, clf_tok, max_length = _load_classifier(p)
    reward = rl_mod.ClassifierReward(model, clf_tok, max_length, p.cfg.rl.reward, tok.bos_token)
    judge = baseline_mod.load(p.path("baseline") / A.BASELINE_FILE)
    history = json.loads((p.path("rl") / "history.json").read_text())
    report = erl.evaluate_rl(generators, tok, reward, judge, p.imdb_test.texts, history, p.cfg.eval,
                             p.cfg.rl, p.cfg.seed, out)
    A.write_json_atomic(out / "rl.json", report)
    return {"metrics": {"rl": report["metrics"]}}


# ---- the table ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    """One stage: its output folder, the stages whose outputs it reads, the config values its
    fingerprint covers (beside ``seed`` and ``data``, which every stage's covers), its function.

    ``config`` maps a key of the fingerprint to a dotted path in the config; the keys are those the
    fingerprints have always used, so that an artifacts directory built before stays up to date."""

    name: str
    output: str  # folder inside the artifacts directory
    run: Callable[[Pipeline, Path], dict | None]  # (pipeline, temporary output folder) -> manifest patch
    inputs: tuple[str, ...] | Callable[[Config], tuple[str, ...]] = ()
    config: dict[str, str] = field(default_factory=dict)  # fingerprint key -> dotted path in the config
    optional: bool = False  # runs only when named (`--stages rl,eval-rl`, `make rl`)
    distributed: bool = False  # under torchrun it runs on every rank (DDP); the others on rank 0 alone
    one_process: bool = False  # refuses torchrun (TRL drives its own devices)

    def inputs_for(self, cfg: Config) -> tuple[str, ...]:
        return self.inputs(cfg) if callable(self.inputs) else self.inputs

    def config_for(self, cfg: Config) -> dict:
        d = cfg.to_dict()
        return {"seed": cfg.seed, "data": d["data"]} | {key: A.get_path(d, path) for key, path in self.config.items()}


def _classifier_inputs(cfg: Config) -> tuple[str, ...]:
    """From scratch: the shared BPE unless it trains its own; ULMFiT: the LM; a pretrained model: nothing."""
    if cfg.classifier.init == SCRATCH:
        return () if cfg.classifier.vocab_size else ("tokenizer",)
    return ("lm",) if cfg.classifier.init == "lm" else ()


# In pipeline order. `--stages all` is every stage that is not optional: rl and eval-rl would take the cpu
# preset past its 20-minute budget (their minutes: docs/TRAINING.md), and `make serve` does not need them.
STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("tokenizer", A.TOKENIZER, tokenizer, config={"tokenizer": "tokenizer", "lm.init": "lm.init"}),
    Stage("lm", A.LM, lm, ("tokenizer",), {"lm": "lm"}, distributed=True),
    Stage("generator", A.GENERATOR, generator, ("lm",), {"generator": "generator"}, distributed=True),
    Stage("classifier", A.CLASSIFIER, classifier, _classifier_inputs,
          {"classifier": "classifier", "min_frequency": "tokenizer.min_frequency"}, distributed=True),
    Stage("baseline", A.BASELINE, baseline, config={"baseline": "baseline"}),
    Stage("eval-classifier", f"{A.REPORTS}/classifier", eval_classifier, ("classifier", "baseline"),
          {"batch_size": "eval.batch_size"}),
    Stage("eval-generator", f"{A.REPORTS}/generator", eval_generator, ("generator", "classifier", "baseline"),
          {"eval": "eval"}),
    Stage("rl", A.RL, rl, ("generator", "classifier"), {"rl": "rl"}, optional=True, one_process=True),
    Stage("eval-rl", f"{A.REPORTS}/rl", eval_rl, ("rl", "generator", "classifier", "baseline"),
          {"eval": "eval", "rl": "rl"}, optional=True, one_process=True),
)}

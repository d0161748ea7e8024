"""Stages ``eval-classifier`` and ``eval-generator``: reports, plots and manifest metrics.

Classifier: IMDB test (all 25,000) and SST-2 validation, with the TF-IDF baseline as a
reference row, and accuracy by text length (IMDB test in word-count quartiles, SST-2 validation
in halves) so a user sees where each model is strong. Generator: perplexity on positive IMDB test reviews, then 100 samples from
"This movie" and 100 from IMDB test review prefixes, each scored by the project classifier
and by the TF-IDF judge (a model no later tuning stage optimises against).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from glowing.progress import progress
from glowing.text import generation_prompt, normalize
from training import baseline as baseline_mod
from training import device as dev
from training import plots
from training.classifier import predict_proba
from training.config import EvalConfig
from training.metrics import binary_metrics, distinct_n, mean_std, perplexity

log = logging.getLogger(__name__)
HEADLINE = ("accuracy", "precision", "recall", "f1", "roc_auc")
LENGTH_BINS = {"imdb_test": 4, "sst2_validation": 2}  # quantile bins of word count per dataset


def accuracy_by_length(texts: list[str], y: np.ndarray, scores: dict[str, np.ndarray], bins: int) -> list[dict]:
    """Accuracy of each model in ``bins`` word-count quantile bins (whitespace words, as a user
    counts them), shortest first, then over all texts."""
    words = np.array([len(t.split()) for t in texts])
    order = np.argsort(words, kind="stable")
    rows = []
    for part in [*np.array_split(order, bins), order] if bins > 1 else [order]:
        if len(part) == 0:
            continue
        row = {"words": f"{words[part].min()}-{words[part].max()}" if len(part) < len(order) else "all",
               "n": int(len(part)), "mean_words": float(words[part].mean())}
        for name, p in scores.items():
            row[name] = float(np.mean((p[part] >= 0.5) == (y[part] == 1)))
        rows.append(row)
    return rows


def evaluate_classifier(model, tokenizer, max_length: int, judge, datasets: dict, batch_size: int,
                        out: Path) -> dict:
    """``datasets``: key (``imdb_test``, ``sst2_validation``) -> Split. Returns the metrics patch."""
    report: dict = {"classifier": {}, "baseline": {}, "by_length": {}}
    for key, split in datasets.items():
        y = (split.labels == 1).astype(int)
        p_model = predict_proba(model, tokenizer, split.texts, max_length, batch_size, progress=f"scoring {key}")
        p_base = baseline_mod.predict_proba(judge, split.texts)
        report["classifier"][key] = binary_metrics(y, p_model)
        report["baseline"][key] = binary_metrics(y, p_base)
        report["by_length"][key] = accuracy_by_length(split.texts, y, {"classifier": p_model, "baseline": p_base},
                                                      LENGTH_BINS.get(key, 1))
        plots.roc_curves({"classifier": (y, p_model), "TF-IDF baseline": (y, p_base)}, f"ROC: {key}",
                         out / f"roc_{key}.png")
        plots.confusion_matrix(report["classifier"][key]["confusion_matrix"], f"classifier: {key}",
                               out / f"confusion_{key}.png")
        log.info("%s: classifier accuracy %.4f (AUC %.4f), baseline accuracy %.4f", key,
                 report["classifier"][key]["accuracy"], report["classifier"][key]["roc_auc"],
                 report["baseline"][key]["accuracy"])
    (out / "classifier.md").write_text(_classifier_markdown(report))
    return report


def _classifier_markdown(report: dict) -> str:
    lines = ["# Classifier evaluation", "",
             "| model | dataset | n | accuracy | precision | recall | F1 | ROC AUC |",
             "|---|---|---|---|---|---|---|---|"]
    for model in ("classifier", "baseline"):
        for key, m in report[model].items():
            name = "TF-IDF + logistic regression" if model == "baseline" else "project classifier"
            lines.append(f"| {name} | {key} | {m['n']:,} | " + " | ".join(f"{m[k]:.4f}" for k in HEADLINE) + " |")
    lines += ["", "## Accuracy by length (words)", "",
              "| dataset | words | n | mean words | project classifier | TF-IDF + logistic regression |",
              "|---|---|---|---|---|---|"]
    for key, rows in report.get("by_length", {}).items():
        lines += [f"| {key} | {r['words']} | {r['n']:,} | {r['mean_words']:.0f} | {r['classifier']:.4f} | "
                  f"{r['baseline']:.4f} |" for r in rows]
    for key, m in report["classifier"].items():
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        lines += ["", f"## {key}: project classifier", "",
                  f"![ROC]({'roc_' + key}.png) ![confusion]({'confusion_' + key}.png)", "",
                  "| | predicted negative | predicted positive |", "|---|---|---|",
                  f"| true negative | {tn:,} | {fp:,} |", f"| true positive | {fn:,} | {tp:,} |", "",
                  "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for cls, r in m["classification_report"].items():
            lines.append(f"| {cls} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {r['support']:,} |")
    return "\n".join(lines) + "\n"


@torch.inference_mode()
def positive_perplexity(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 16) -> dict:
    """Perplexity of ``<eos> review`` sequences (truncated to the model's context)."""
    model.eval()
    ids = [[tokenizer.eos_token_id] + x for x in
           tokenizer([normalize(t) for t in texts], add_special_tokens=False, truncation=True,
                     max_length=max_length - 1)["input_ids"]]
    order = np.argsort([len(x) for x in ids])
    total_nll, n_tokens = 0.0, 0
    for start in progress(range(0, len(order), batch_size), desc="perplexity", unit="batch"):
        batch = [ids[i] for i in order[start : start + batch_size]]
        width = max(len(x) for x in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, seq in enumerate(batch):
            input_ids[row, : len(seq)], mask[row, : len(seq)] = torch.tensor(seq), 1
        input_ids, mask = input_ids.to(dev.of(model)), mask.to(dev.of(model))
        with dev.autocast(dev.of(model)):
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total_nll += float(torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets,
                                                             ignore_index=-100, reduction="sum"))
        n_tokens += int((targets != -100).sum())
    return {"perplexity": perplexity(total_nll, n_tokens), "reviews": len(texts), "tokens": n_tokens}


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], cfg: EvalConfig, seed: int, on_batch=None) -> list[str]:
    """Sampled reviews (prompt + continuation), left-padded batches, stopping at end of text.

    ``on_batch(prompt_ids, prompt_mask, tokens)``, when given, sees each batch's token ids."""
    tokenizer.padding_side = "left"
    torch.manual_seed(seed)
    out: list[str] = []
    for start in progress(range(0, len(prompts), cfg.gen_batch_size), desc="generating", unit="batch"):
        batch = prompts[start : start + cfg.gen_batch_size]
        enc = tokenizer([generation_prompt(p, tokenizer.bos_token) for p in batch], return_tensors="pt",
                        padding=True, add_special_tokens=False).to(dev.of(model))
        tokens = model.generate(**enc, do_sample=True, max_new_tokens=cfg.max_new_tokens,
                                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        if on_batch is not None:
            on_batch(enc["input_ids"], enc["attention_mask"], tokens)
        new = tokens[:, enc["input_ids"].shape[1]:]
        out.extend(p + tokenizer.decode(row, skip_special_tokens=True) for p, row in zip(batch, new))
    return out


def review_openings(tokenizer, texts: list[str], n: int, lo: int, hi: int, seed: int,
                    drop_blank: bool = False) -> list[str]:
    """Openings of ``n`` seeded picks of ``texts``, each cut to a random ``lo..hi`` tokens: the test-prefix
    prompts of the evaluations and the RL stage's training queries. A blank opening is dropped
    (``drop_blank``) or replaced by the review's first 20 characters."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(texts), size=min(n, len(texts)), replace=False)
    out = []
    for i in picks:
        ids = tokenizer(normalize(texts[i]), add_special_tokens=False)["input_ids"]
        opening = tokenizer.decode(ids[: int(rng.integers(lo, hi + 1))]).strip()
        if opening or not drop_blank:
            out.append(opening or normalize(texts[i])[:20])
    return out


def evaluate_generator(gen_model, gen_tokenizer, clf_model, clf_tokenizer, clf_max_length: int, judge,
                       positive_test: list[str], test_texts: list[str], cfg: EvalConfig, seed: int,
                       out: Path) -> dict:
    ppl_texts = positive_test if cfg.ppl_reviews <= 0 else positive_test[: cfg.ppl_reviews]
    report: dict = {"positive_test": positive_perplexity(gen_model, gen_tokenizer, ppl_texts,
                                                         gen_model.config.n_positions), "samples": {}}
    prompt_sets = {
        "this_movie": [cfg.prompt] * cfg.n_samples,
        "test_prefixes": review_openings(gen_tokenizer, test_texts, cfg.n_samples, cfg.prefix_min_tokens,
                                       cfg.prefix_max_tokens, seed),
    }
    rows, hist, every = [], {}, {"texts": [], "model": [], "judge": []}
    for offset, (name, prompts) in enumerate(prompt_sets.items()):
        texts = generate(gen_model, gen_tokenizer, prompts, cfg, seed + offset)
        p_model = predict_proba(clf_model, clf_tokenizer, texts, clf_max_length)
        p_judge = baseline_mod.predict_proba(judge, texts)
        report["samples"][name] = _sample_stats(texts, p_model, p_judge)
        hist[name] = {"project classifier": p_model, "TF-IDF judge": p_judge}
        rows += [(name, p, t, pm, pj) for p, t, pm, pj in zip(prompts, texts, p_model, p_judge)]
        every["texts"] += texts
        every["model"] += list(p_model)
        every["judge"] += list(p_judge)
        log.info("samples %s: mean P(positive) %.3f by the classifier, %.3f by the judge; distinct-2 %.3f",
                 name, report["samples"][name]["mean_p_positive"], report["samples"][name]["judge_mean_p_positive"],
                 report["samples"][name]["distinct_2"])
    report["samples"].update(_sample_stats(every["texts"], np.array(every["model"]), np.array(every["judge"])))
    plots.p_positive_histograms(hist, out / "p_positive_hist.png")
    (out / "samples.md").write_text(_samples_markdown(rows))
    (out / "generator.md").write_text(_generator_markdown(report, rows))
    return report


def _sample_stats(texts: list[str], p_model: np.ndarray, p_judge: np.ndarray) -> dict:
    mean, std = mean_std(p_model)
    jmean, jstd = mean_std(p_judge)
    return {"n": len(texts), "mean_p_positive": mean, "std_p_positive": std, "judge_mean_p_positive": jmean,
            "judge_std_p_positive": jstd, "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
            "mean_words": float(np.mean([len(t.split()) for t in texts]))}


def _cell(text: str, limit: int = 400) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _samples_markdown(rows: list) -> str:
    lines = ["# Generated reviews", "", "P(positive) by the project classifier and by the TF-IDF judge.", "",
             "| set | prompt | review | classifier | judge |", "|---|---|---|---|---|"]
    lines += [f"| {s} | {_cell(p, 60)} | {_cell(t)} | {pm:.3f} | {pj:.3f} |" for s, p, t, pm, pj in rows]
    return "\n".join(lines) + "\n"


def _generator_markdown(report: dict, rows: list) -> str:
    s = report["samples"]
    lines = ["# Generator evaluation", "",
             f"Perplexity on {report['positive_test']['reviews']:,} positive IMDB test reviews: "
             f"**{report['positive_test']['perplexity']:.2f}**", "",
             "| samples | n | P(positive) classifier | P(positive) judge | distinct-1 | distinct-2 | words |",
             "|---|---|---|---|---|---|---|"]
    for name, stats in [("this_movie", s["this_movie"]), ("test_prefixes", s["test_prefixes"]), ("all", s)]:
        lines.append(f"| {name} | {stats['n']} | {stats['mean_p_positive']:.3f} ± {stats['std_p_positive']:.3f} | "
                     f"{stats['judge_mean_p_positive']:.3f} ± {stats['judge_std_p_positive']:.3f} | "
                     f"{stats['distinct_1']:.3f} | {stats['distinct_2']:.3f} | {stats['mean_words']:.0f} |")
    lines += ["", "![P(positive)](p_positive_hist.png)", "", "## Samples (first 5 of each set; all in samples.md)", "",
              "| set | review | classifier | judge |", "|---|---|---|---|"]
    seen: dict[str, int] = {}
    for name, _, text, pm, pj in rows:
        seen[name] = seen.get(name, 0) + 1
        if seen[name] <= 5:
            lines.append(f"| {name} | {_cell(text)} | {pm:.3f} | {pj:.3f} |")
    return "\n".join(lines) + "\n"

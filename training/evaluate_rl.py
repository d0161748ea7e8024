"""Stage ``eval-rl``: the fine-tuned and the RL-tuned generator side by side.

Both generators answer the same prompts (``eval.n_samples`` x "This movie" and as many IMDB *test*
review openings of 2-8 tokens) with the same seeds and the sampling settings the tuning used
(``rl.max_new_tokens``, ``rl.temperature``, ``rl.top_k``, ``rl.top_p``), for both. Each sample set gets the project classifier's and the TF-IDF judge's mean P(positive),
distinct-1/2, the mean reward, the perplexity of the samples under the fine-tuned model and the
KL from the generator to the fine-tuned one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from training import baseline as baseline_mod
from training import evaluate as ev
from training import rl as rl_mod
from training.config import EvalConfig, RLConfig

log = logging.getLogger(__name__)
TABLE_ROWS = 16  # before/after rows in rl.md, like the reference notebook's 16 queries


def sample_with_kl(model, reference, tokenizer, prompts: list[str], cfg: EvalConfig, seed: int):
    """(texts, per-sample KL(model || reference) estimates in nats): log-ratios of the sampled
    response tokens, end-of-text included, under both models at temperature 1."""
    kls: list[float] = []

    def on_batch(prompt_ids, prompt_mask, tokens):
        response = tokens[:, prompt_ids.shape[1]:]
        response_mask = (response != tokenizer.pad_token_id).long()
        if tokenizer.pad_token_id == tokenizer.eos_token_id:  # keep the first end-of-text of each row
            response_mask = (torch.cumsum(response == tokenizer.eos_token_id, -1) <= 1).long()
        attention = torch.cat([prompt_mask, response_mask], dim=1)
        mask = torch.cat([torch.zeros_like(prompt_mask), response_mask], dim=1)
        kls.extend(rl_mod.kl_to_reference(model, reference, tokens, attention, mask).tolist())

    texts = ev.generate(model, tokenizer, prompts, cfg, seed, on_batch=on_batch)
    return texts, np.asarray(kls)


def evaluate_rl(generators: dict, tokenizer, reward: rl_mod.ClassifierReward, judge, test_texts: list[str],
                history: list[dict], eval_cfg: EvalConfig, rl_cfg: RLConfig, seed: int, out: Path) -> dict:
    """``generators``: {"finetuned": model, "tuned": model}. Returns {"metrics": ..., "rows": ...}."""
    cfg = EvalConfig(**{**eval_cfg.__dict__, "max_new_tokens": rl_cfg.max_new_tokens,
                        "temperature": rl_cfg.temperature, "top_k": rl_cfg.top_k, "top_p": rl_cfg.top_p})
    prompt_sets = {
        "this_movie": [cfg.prompt] * cfg.n_samples,
        "test_prefixes": ev.review_openings(tokenizer, test_texts, cfg.n_samples, cfg.prefix_min_tokens,
                                          cfg.prefix_max_tokens, seed),
    }
    reference = generators["finetuned"]
    metrics: dict = {}
    samples: dict = {}
    for name, model in generators.items():
        every: dict = {"texts": [], "model": [], "judge": [], "reward": [], "kl": []}
        metrics[name] = {}
        for offset, (set_name, prompts) in enumerate(prompt_sets.items()):
            texts, kl = sample_with_kl(model, reference, tokenizer, prompts, cfg, seed + offset)
            rewards = reward.score(texts)
            p_model = 1.0 / (1.0 + np.exp(-rewards)) if reward.kind == "logit" else rewards
            p_judge = baseline_mod.predict_proba(judge, texts)
            metrics[name][set_name] = ev._sample_stats(texts, p_model, p_judge) | {
                "mean_reward": float(np.mean(rewards)), "kl_to_finetuned": float(np.mean(kl))}
            for key, values in (("texts", texts), ("model", p_model), ("judge", p_judge), ("reward", rewards),
                                ("kl", kl)):
                every[key] += list(values)
        stats = ev._sample_stats(every["texts"], np.array(every["model"]), np.array(every["judge"]))
        ppl = ev.positive_perplexity(reference, tokenizer, every["texts"], reference.config.n_positions)
        metrics[name].update(stats | {"mean_reward": float(np.mean(every["reward"])),
                                      "kl_to_finetuned": float(np.mean(every["kl"])),
                                      "perplexity_under_finetuned": ppl["perplexity"]})
        samples[name] = every
        log.info("%s: judge P(positive) %.3f, classifier %.3f, distinct-2 %.3f, reward %.3f, KL %.3f, ppl %.1f",
                 name, stats["judge_mean_p_positive"], stats["mean_p_positive"], stats["distinct_2"],
                 metrics[name]["mean_reward"], metrics[name]["kl_to_finetuned"], ppl["perplexity"])
    before, after = metrics["finetuned"], metrics["tuned"]
    metrics["delta"] = {k: after[k] - before[k] for k in ("judge_mean_p_positive", "mean_p_positive", "distinct_2",
                                                          "mean_reward")}
    metrics["targets"] = targets(before, after, samples["tuned"]["texts"])
    metrics["settings"] = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                           "top_k": cfg.top_k, "top_p": cfg.top_p, "samples": len(samples["tuned"]["texts"]),
                           "reward": reward.kind}
    prompts = [p for ps in prompt_sets.values() for p in ps]
    sets = [s for s, ps in prompt_sets.items() for _ in ps]
    rows = [(s, q, samples["finetuned"]["texts"][i], samples["tuned"]["texts"][i], samples["finetuned"]["reward"][i],
             samples["tuned"]["reward"][i], samples["finetuned"]["judge"][i], samples["tuned"]["judge"][i])
            for i, (s, q) in enumerate(zip(sets, prompts))]
    rl_mod.reward_curve_plot(history, out / "reward_curve.png")
    (out / "samples.md").write_text(_samples_markdown(rows, reward.kind))
    (out / "rl.md").write_text(_report_markdown(metrics, rows, reward.kind))
    return {"metrics": metrics, "history": history}


def targets(before: dict, after: dict, texts: list[str]) -> dict:
    """The issue's targets for the tuned generator, each with its figure and whether it holds."""
    top = max(texts.count(t) for t in texts) / len(texts)
    gain = after["judge_mean_p_positive"] - before["judge_mean_p_positive"]
    return {"judge_gain_at_least_0.1": {"value": gain, "met": gain >= 0.1},
            "judge_at_least_0.9": {"value": after["judge_mean_p_positive"],
                                   "met": after["judge_mean_p_positive"] >= 0.9},
            "distinct_2_at_least_0.5": {"value": after["distinct_2"], "met": after["distinct_2"] >= 0.5},
            "most_common_sample_share": {"value": top, "met": top <= 0.05}}


def _report_markdown(m: dict, rows: list, kind: str) -> str:
    b, a, s = m["finetuned"], m["tuned"], m["settings"]
    lines = ["# RL tuning: fine-tuned vs tuned generator", "",
             f"{s['samples']} samples each (half \"This movie\", half IMDB test openings of 2-8 tokens), the same "
             f"prompts and seeds for both; {s['max_new_tokens']} new tokens, temperature {s['temperature']}, "
             f"top-k {s['top_k']}, top-p {s['top_p']}. Reward: the classifier's "
             f"{'positive log-odds' if kind == 'logit' else 'P(positive)'}.", "",
             "| metric | fine-tuned | tuned | change |", "|---|---|---|---|"]
    for key, label in (("judge_mean_p_positive", "mean P(positive), TF-IDF judge"),
                       ("mean_p_positive", "mean P(positive), project classifier"),
                       ("mean_reward", "mean reward"), ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"),
                       ("perplexity_under_finetuned", "perplexity under the fine-tuned model"),
                       ("kl_to_finetuned", "KL to the fine-tuned model (nats per sample)"),
                       ("mean_words", "words per sample")):
        lines.append(f"| {label} | {b[key]:.3f} | {a[key]:.3f} | {a[key] - b[key]:+.3f} |")
    lines += ["", "| set | judge before | judge after | classifier before | classifier after | distinct-2 before | "
              "distinct-2 after |", "|---|---|---|---|---|---|---|"]
    for name in ("this_movie", "test_prefixes"):
        lines.append(f"| {name} | {b[name]['judge_mean_p_positive']:.3f} | {a[name]['judge_mean_p_positive']:.3f} | "
                     f"{b[name]['mean_p_positive']:.3f} | {a[name]['mean_p_positive']:.3f} | "
                     f"{b[name]['distinct_2']:.3f} | {a[name]['distinct_2']:.3f} |")
    lines += ["", "| target | value | met |", "|---|---|---|"]
    lines += [f"| {k} | {v['value']:.3f} | {'yes' if v['met'] else 'no'} |" for k, v in m["targets"].items()]
    lines += ["", "![reward curve](reward_curve.png)", "",
              f"## Before and after: the first {TABLE_ROWS} test openings (all 200 rows in samples.md)", "",
              "| query | response before | response after | reward before | reward after |", "|---|---|---|---|---|"]
    test_rows = [r for r in rows if r[0] == "test_prefixes"][:TABLE_ROWS]
    lines += [f"| {ev._cell(q, 60)} | {ev._cell(fb[len(q):], 300)} | {ev._cell(fa[len(q):], 300)} | {rb:.2f} | "
              f"{ra:.2f} |" for _, q, fb, fa, rb, ra, _, _ in test_rows]
    mean_b = np.mean([r[4] for r in test_rows])
    mean_a = np.mean([r[5] for r in test_rows])
    lines += [f"| **mean** | | | **{mean_b:.2f}** | **{mean_a:.2f}** |"]
    return "\n".join(lines) + "\n"


def _samples_markdown(rows: list, kind: str) -> str:
    lines = ["# Fine-tuned vs tuned generator: every sample", "",
             f"Reward = the classifier's {'positive log-odds' if kind == 'logit' else 'P(positive)'}; "
             "judge = P(positive) by the TF-IDF judge.", "",
             "| set | query | response before | response after | reward before | reward after | judge before | "
             "judge after |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {s} | {ev._cell(q, 60)} | {ev._cell(fb[len(q):])} | {ev._cell(fa[len(q):])} | {rb:.2f} | {ra:.2f} | "
              f"{jb:.3f} | {ja:.3f} |" for s, q, fb, fa, rb, ra, jb, ja in rows]
    return "\n".join(lines) + "\n"

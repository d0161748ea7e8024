"""Proof that the exported models compute what the PyTorch models compute.

Gating checks (the export fails when one does not hold):
  * classifier_logits: fp32 ONNX vs PyTorch logits on real IMDB reviews of varied length,
    batched with right padding, max abs difference <= 1e-4; both on identical padded batches
    and through the runtime scorer (its own length-sorted batches);
  * generator_greedy: greedy generation from a batch of left-padded prompts: the ONNX runtime's
    tokens identical to PyTorch ``model.generate`` (and to the runtime's torch backend);
  * int8_accuracy: int8 accuracy on IMDB test (a fixed sample, >= 5,000 reviews by default)
    within 0.5 points of fp32;
  * int8_graph: the int8 graph really holds integer operators;
  * generator_int8 (when the generator has an int8 variant): teacher-forced on positive reviews,
    int8 perplexity within 2% of fp32; recorded: the share of positions where both pick the same
    greedy next token, and for each precision how much a row moves in a padded batch;
  * fp16: the fp16 variants give finite outputs (their differences are recorded, not gated).
The PyTorch side uses transformers' own tokenizer and ``generate``: the references are
independent of the runtime code they check.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from export.quantize import quantized_op_counts
from export.labelled_reviews import Reviews
from glowing.runtime import SamplingSettings, load_generator, load_scorer
from glowing.runtime.generator import left_pad
from glowing.runtime.files import ONNX_FILES
from glowing.text import generation_prompt, normalize

log = logging.getLogger(__name__)
LOGITS_ATOL = 1e-4
INT8_MAX_DELTA_POINTS = 0.5
INT8_MAX_PERPLEXITY_RATIO = 1.02
FP16_WARN_DIFF = 0.01


class ParityError(RuntimeError):
    pass


def classifier_logits(onnx_dir: Path, torch_dir: Path, reviews: Reviews, batch_size: int = 16) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from glowing.runtime.onnx_backend import OnnxClassifier, create_session

    tok = AutoTokenizer.from_pretrained(torch_dir)
    tok.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(torch_dir).eval()
    path = onnx_dir / ONNX_FILES["fp32"]
    session = OnnxClassifier(create_session(path, device="cpu", precision="fp32", threads=None, fix=""), path, "")
    scorer = load_scorer(onnx_dir, "onnx", "cpu", "fp32")
    ref, same_batches, lengths, pads = [], [], [], 0
    for start in range(0, len(reviews), batch_size):  # in random order: lengths mixed, much padding
        texts = [normalize(t) for t in reviews.texts[start : start + batch_size]]
        enc = tok(texts, padding=True, truncation=True, max_length=scorer.max_length, return_tensors="np")
        mask = enc["attention_mask"]
        with torch.inference_mode():
            ref.append(model(input_ids=torch.from_numpy(enc["input_ids"]),
                             attention_mask=torch.from_numpy(mask)).logits.numpy())
        same_batches.append(session(enc["input_ids"].astype(np.int64), mask.astype(np.int64)))
        lengths += mask.sum(axis=1).tolist()
        pads += int(mask.size - mask.sum())
    ref_logits = np.concatenate(ref)
    diff_same = float(np.abs(np.concatenate(same_batches) - ref_logits).max())
    diff_runtime = float(np.abs(scorer.logits(reviews.texts) - ref_logits).max())
    return {"reviews": len(reviews), "batch_size": batch_size, "max_length": scorer.max_length,
            "tokens": {"min": min(lengths), "median": float(np.median(lengths)), "max": max(lengths)},
            "padding_share": round(pads / (pads + sum(lengths)), 3),
            "max_abs_diff_same_batches": diff_same, "max_abs_diff_runtime": diff_runtime,
            "max_abs_diff": max(diff_same, diff_runtime), "threshold": LOGITS_ATOL,
            "passed": max(diff_same, diff_runtime) <= LOGITS_ATOL}


def make_prompts(reviews: Reviews, n: int, tokenizer, budget: int) -> list[str]:
    """Openings of real reviews, 1 to 24 words (so the batch is left-padded), at most ``budget`` tokens."""
    words = [1, 3, 6, 10, 2, 15, 24, 4]
    prompts = []
    for i, text in enumerate(reviews.texts[:n]):
        k = words[i % len(words)]
        while True:
            prompt = " ".join(normalize(text).split()[:k])
            ids = tokenizer(generation_prompt(prompt, tokenizer.bos_token), add_special_tokens=False)["input_ids"]
            if len(ids) <= budget or k == 1:
                break
            k -= 1
        prompts.append(prompt)
    return prompts


def generator_greedy(onnx_dir: Path, torch_dir: Path, reviews: Reviews, n_prompts: int = 8,
                     max_new_tokens: int = 32) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(torch_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(torch_dir).eval()
    n_positions = model.config.n_positions
    max_new_tokens = min(max_new_tokens, n_positions // 2)
    prompts = make_prompts(reviews, n_prompts, tok, n_positions - max_new_tokens)
    enc = tok([generation_prompt(p, tok.bos_token) for p in prompts], add_special_tokens=False, padding=True,
              return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, temperature=None, top_k=None, top_p=None)
    reference = [_until_eos(row, tok.eos_token_id) for row in out[:, enc["input_ids"].shape[1] :].tolist()]
    greedy = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0)
    onnx_ids = load_generator(onnx_dir, "onnx", "cpu").generate_ids(prompts, greedy)
    torch_ids = load_generator(torch_dir, "torch", "cpu").generate_ids(prompts, greedy)
    same = [a == b for a, b in zip(onnx_ids, reference)]
    first = next((i for i, ok in enumerate(same) if not ok), None)
    return {"prompts": len(prompts), "prompt_tokens": enc["attention_mask"].sum(dim=1).tolist(),
            "max_new_tokens": max_new_tokens, "new_tokens": [len(x) for x in reference],
            "identical_rows": sum(same), "runtime_torch_identical": torch_ids == reference,
            "first_mismatch": None if first is None else {"row": first, "prompt": prompts[first],
                                                          "torch": reference[first], "onnx": onnx_ids[first]},
            "passed": all(same)}


def _until_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def int8_accuracy(onnx_dir: Path, reviews: Reviews) -> dict[str, Any]:
    labels = reviews.labels == 1
    result: dict[str, Any] = {"reviews": len(reviews)}
    probs = {}
    for precision in ("fp32", "int8"):
        started = time.perf_counter()
        probs[precision] = np.asarray(load_scorer(onnx_dir, "onnx", "cpu", precision).score(reviews.texts))
        result[f"accuracy_{precision}"] = float(np.mean((probs[precision] >= 0.5) == labels))
        log.info("int8 check: %s accuracy %.4f on %d reviews (%.1f s)", precision, result[f"accuracy_{precision}"],
                 len(reviews), time.perf_counter() - started)
    delta = 100 * (result["accuracy_int8"] - result["accuracy_fp32"])
    result.update({"delta_points": delta, "agreement": float(np.mean((probs["fp32"] >= 0.5) == (probs["int8"] >= 0.5))),
                   "max_abs_diff_p": float(np.abs(probs["fp32"] - probs["int8"]).max()),
                   "threshold_points": INT8_MAX_DELTA_POINTS, "passed": abs(delta) <= INT8_MAX_DELTA_POINTS})
    return result


def int8_graph(onnx_dir: Path) -> dict[str, Any]:
    ops = quantized_op_counts(onnx_dir / ONNX_FILES["int8"])
    integer = sum(ops.get(op, 0) for op in ("MatMulInteger", "DynamicQuantizeMatMul", "QAttention"))
    return {"quantized_ops": ops, "passed": integer > 0}


def generator_int8(onnx_dir: Path, reviews: Reviews, n_reviews: int = 64, tokens: int = 64) -> dict[str, Any]:
    """int8 vs fp32 generator on the openings of positive reviews (prompt format of the service),
    each fed token by token through the KV cache as the runtime decodes."""
    fp32 = load_generator(onnx_dir, "onnx", "cpu", "fp32")
    int8 = load_generator(onnx_dir, "onnx", "cpu", "int8")
    codec = fp32.codec
    texts = [t for t, label in zip(reviews.texts, reviews.labels) if label == 1][:n_reviews]
    encoded = codec.tokenizer.encode_batch([generation_prompt(t, codec.bos_token) for t in texts],
                                           add_special_tokens=False)
    ids = [e.ids[: min(tokens, fp32.n_positions)] for e in encoded if len(e.ids) >= 2]
    nll, greedy = {}, {}
    for name, gen in (("fp32", fp32), ("int8", int8)):
        nll[name], greedy[name] = _teacher_forced(gen.lm, ids, codec.pad_id)
    ppl = {name: float(np.exp(np.mean(v))) for name, v in nll.items()}
    ratio = ppl["int8"] / ppl["fp32"]
    alone = {name: _alone_vs_batched(gen, texts[:8]) for name, gen in (("fp32", fp32), ("int8", int8))}
    return {"reviews": len(ids), "tokens": int(len(nll["fp32"])), "perplexity_fp32": ppl["fp32"],
            "perplexity_int8": ppl["int8"], "perplexity_ratio": ratio,
            "greedy_agreement": float(np.mean(greedy["fp32"] == greedy["int8"])),
            **{f"{k}_{name}": v for name, figures in alone.items() for k, v in figures.items()},
            "threshold_ratio": INT8_MAX_PERPLEXITY_RATIO, "passed": bool(ratio <= INT8_MAX_PERPLEXITY_RATIO)}


def _alone_vs_batched(gen, texts: list[str], new: int = 32) -> dict[str, Any]:
    """How far a row moves when it shares a left-padded batch (the serving engine's batches): the
    largest logit difference over the prefill and two steps, and how many seeded sampled rows come
    out identical alone and together. fp32 differs in rounding only (attention sums of other
    lengths); int8 quantizes each activation row on its own (MatMulNBits), so only that rounding
    reaches it, amplified where it crosses a quantization step. Recorded, not gated."""
    rows = [ids[: 4 + 3 * i] for i, ids in enumerate(gen.encode(texts, [SamplingSettings()] * len(texts))[0])]
    pad = gen.codec.pad_id

    def logits(batch: list[list[int]]) -> list[np.ndarray]:
        input_ids, mask, positions = _left_padded(batch, pad)
        out, past = [], None
        tokens = input_ids
        for _ in range(3):
            step, past = gen.lm.forward(tokens, mask, positions, past)
            out.append(step)
            tokens = step.argmax(axis=-1)[:, None].astype(np.int64)
            mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
            positions = positions[:, -1:] + 1
        return out

    together = logits(rows)
    diff = max(float(np.abs(a[0] - t[r]).max()) for r, seq in enumerate(rows) for a, t in zip(logits([seq]), together))
    settings = [SamplingSettings(max_new_tokens=new, top_k=50, top_p=0.95, seed=i) for i in range(len(texts))]
    batched = gen.generate_ids(texts, settings)
    same = sum(gen.generate_ids([t], [s])[0] == b for t, s, b in zip(texts, settings, batched))
    return {"alone_vs_batched_max_abs_diff": diff, "seeded_rows_identical": f"{same}/{len(texts)}"}


def _left_padded(ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids and mask left-padded as the runtime pads them, and the positions it gives them."""
    batch, mask = left_pad(ids, pad_id)
    return batch, mask, np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)


def _teacher_forced(lm, ids: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Negative log-likelihood of each real next token, and the greedy choice there, feeding the
    left-padded batch one column at a time (the last-position logits the decoding graph gives)."""
    batch, mask, positions = _left_padded(ids, pad_id)
    past, nll, greedy = None, [], []
    for t in range(batch.shape[1] - 1):
        logits, past = lm.forward(batch[:, t : t + 1], mask[:, : t + 1], positions[:, t : t + 1], past)
        real = (mask[:, t] == 1) & (mask[:, t + 1] == 1)
        shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        nll.append(-logp[np.arange(len(ids)), batch[:, t + 1]][real])
        greedy.append(logits.argmax(axis=-1)[real])
    return np.concatenate(nll), np.concatenate(greedy)


def fp16(clf_dir: Path, gen_dir: Path, reviews: Reviews, prompts: int, max_new_tokens: int) -> dict[str, Any]:
    """Recorded on CPU (the GPU is where fp16 is meant to run); only non-finite outputs fail."""
    p32 = np.asarray(load_scorer(clf_dir, "onnx", "cpu", "fp32").score(reviews.texts))
    p16 = np.asarray(load_scorer(clf_dir, "onnx", "cpu", "fp16").score(reviews.texts))
    greedy = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0)
    texts = [" ".join(t.split()[:5]) for t in reviews.texts[:prompts]]
    ids32 = load_generator(gen_dir, "onnx", "cpu", "fp32").generate_ids(texts, greedy)
    ids16 = load_generator(gen_dir, "onnx", "cpu", "fp16").generate_ids(texts, greedy)
    diff = float(np.abs(p32 - p16).max())
    if diff > FP16_WARN_DIFF:
        log.warning("fp16 classifier: P(positive) differs from fp32 by up to %.4f", diff)
    return {"provider": "CPUExecutionProvider", "classifier_max_abs_diff_p": diff,
            "classifier_agreement": float(np.mean((p32 >= 0.5) == (p16 >= 0.5))),
            "generator_identical_greedy_rows": f"{sum(a == b for a, b in zip(ids32, ids16))}/{len(texts)}",
            "passed": bool(np.isfinite(p16).all())}


def run_all(onnx_root: Path, artifacts: Path, reviews: Reviews, *, parity_sample: int, int8_sample: int,
            gen_prompts: int, gen_tokens: int, seed: int, generator_source: Path | None = None) -> dict[str, Any]:
    clf_dir, gen_dir = onnx_root / "classifier", onnx_root / "generator"
    generator_source = generator_source or artifacts / "generator"  # the trained model that was exported
    sample = reviews.spread(parity_sample, seed)
    checks = {}
    steps = [("classifier_logits", lambda: classifier_logits(clf_dir, artifacts / "classifier", sample)),
             ("generator_greedy", lambda: generator_greedy(gen_dir, generator_source, sample, gen_prompts,
                                                            gen_tokens)),
             ("int8_graph", lambda: int8_graph(clf_dir)),
             ("int8_accuracy", lambda: int8_accuracy(clf_dir, reviews.sample(int8_sample, seed + 1))),
             *([("generator_int8", lambda: generator_int8(gen_dir, sample))]
               if (gen_dir / ONNX_FILES["int8"]).is_file() else []),
             ("fp16", lambda: fp16(clf_dir, gen_dir, sample, gen_prompts, gen_tokens))]
    for name, check in steps:
        started = time.perf_counter()
        checks[name] = check()
        checks[name]["seconds"] = round(time.perf_counter() - started, 1)
        log.info("parity %s: %s (%.1f s)", name, "ok" if checks[name]["passed"] else "FAILED", checks[name]["seconds"])
    return {"data": reviews.origin, "seed": seed, "passed": all(c["passed"] for c in checks.values()), **checks}


def failures(report: dict[str, Any]) -> list[str]:
    """One line per failed check, with its figures."""
    lines = []
    for name, check in report.items():
        if isinstance(check, dict) and not check.get("passed", True):
            figures = {k: v for k, v in check.items() if k not in ("passed", "seconds", "first_mismatch")}
            lines.append(f"{name}: {figures}")
    return lines

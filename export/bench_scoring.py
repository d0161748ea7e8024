"""How the classifier's texts are grouped into model calls, and what it costs: in-process, on CPU.

    python -m export.bench_scoring --artifacts artifacts --data-dir ../shared/data     # about 4 min, 2 cores
    python -m export.bench_scoring --artifacts artifacts --fit                         # + the planner's cost model
    python -m export.bench_scoring --artifacts artifacts --before --precisions fp32    # + the graph served before

The 256 texts the load test sends to ``/score`` (``loadtests.payloads.sample``: a third each short,
middle and long IMDB test reviews, in a seeded arrival order), scored end to end (texts in,
P(positive) out, tokenization included) in ms per text, grouped six ways:

- one text per call;
- arrival order, 16 texts per request, one model call per request padded to its longest text
  (the plan before length-aware calls, what adaptive batching of 16 texts gave the model);
- arrival order, 16 per request, split into calls by the planner (``plan_calls``);
- length-sorted, 16 per call: the reference an oracle that saw every text first would reach;
- all 256 at once, split by the planner;
- through ``ScoreQueue``: 256 concurrent one-text requests, ``max_texts`` 16.

Rows for fp32, int8 (one text per call: its served rule; the planner row is for reference only,
int8 scores move with their batch partners, by the figure printed) and fp16 (the GPU format, on
CPU here). Each figure is the median of ``--repeats`` passes, contenders taking turns within each
repeat; "paired" is the median over repeats of a pass's time over the length-sorted pass of the
same repeat (load that comes and goes hits both). Padding share: 1 - real tokens / padded
positions, over a pass and per model call.
``--fit`` also times model calls over a grid of rows x padded length and fits
``cost = c0 + a x positions + b x rows x length^2``: the planner's ``CALL_OVERHEAD`` is c0/a,
its ``ATTENTION_SPAN`` a/b. Writes OUT/bench_scoring.json (raw passes too) and .md; prints the
table. Target: arrival-order requests of 16 with the planner within 1.1x of length-sorted 16s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from export.bench import machine, race
from glowing import artifacts as A
from glowing import logs
from glowing.runtime import ModelFileError, ScoreQueue, load_scorer, plan_calls

log = logging.getLogger("export.bench_scoring")
REQUEST = 16
ONE, MAIN, PLANNED, SORTED, ALL, QUEUE = ("one text per call", "arrival 16, one call each (main)",
                                          "arrival 16, planner", "length-sorted 16", "all 256, planner",
                                          "ScoreQueue, 256 requests")
CONTENDERS = {"fp32": (ONE, MAIN, PLANNED, SORTED, ALL, QUEUE), "int8": (ONE, PLANNED, QUEUE),
              "fp16": (ONE, MAIN, PLANNED, SORTED, ALL)}
GRID_ROWS, GRID_LENGTHS, GRID_MAX_POSITIONS = (1, 2, 4, 8, 16, 32), (16, 32, 64, 128, 256, 512), 16384


def groupings(lengths: list[int]) -> dict[str, list[tuple[list[int], bool]]]:
    """Each contender: its requests (text indices), and whether the planner splits them (else one call)."""
    n = len(lengths)
    arrival = [list(range(s, min(s + REQUEST, n))) for s in range(0, n, REQUEST)]
    order = sorted(range(n), key=lengths.__getitem__)
    return {ONE: [([i], False) for i in range(n)], MAIN: [(g, False) for g in arrival],
            PLANNED: [(g, True) for g in arrival],
            SORTED: [(order[s : s + REQUEST], False) for s in range(0, n, REQUEST)], ALL: [(list(range(n)), True)]}


def score_pass(scorer, texts: list[str], requests: list[tuple[list[int], bool]], on_call=None) -> int:
    for group, planned in requests:
        ids = scorer.encode([texts[i] for i in group])
        scorer.probabilities(scorer.logits_from_ids(ids, None if planned else [list(range(len(ids)))], on_call))
    return len(texts)


def queue_pass(scorer, texts: list[str], on_call=None) -> int:
    async def run():
        queue = ScoreQueue(scorer, max_texts=REQUEST, on_call=on_call)
        await asyncio.gather(*(queue.score([t]) for t in texts))
        await queue.aclose()

    asyncio.run(run())
    return len(texts)


def padding(calls: list[tuple[int, int, int]]) -> dict[str, Any]:
    """Calls per pass, rows per call, and the padding share overall and per call."""
    shares = [1 - real / padded for _, padded, real in calls]
    return {"calls": len(calls), "mean_rows": statistics.mean(c[0] for c in calls),
            "padding_share": 1 - sum(c[2] for c in calls) / sum(c[1] for c in calls),
            "call_padding_median": float(np.median(shares)), "call_padding_p90": float(np.quantile(shares, 0.9)),
            "call_padding_max": max(shares)}


def fused_classifier(artifacts: Path, out: Path) -> Path:
    """The scoring graph the export served before the last-position one (export/classifier_graph.py):
    Optimum's export of ARTIFACTS/classifier with attention fused (export/fuse.py), in
    OUT/fused-classifier/ beside the served folder's tokenizer and config; built once per weights file
    (its sha256 kept in OUT/fused-classifier/weights.sha256)."""
    from export import fuse, onnx_export
    from glowing.runtime.files import TORCH_WEIGHTS

    target = out / "fused-classifier"
    source = next((artifacts / A.CLASSIFIER / n for n in TORCH_WEIGHTS if (artifacts / A.CLASSIFIER / n).is_file()),
                  None)
    if source is None:
        raise ModelFileError(artifacts / A.CLASSIFIER, "no trained weights to export the fused graph from",
                             f"build them with `python -m training --out {artifacts}`")
    digest = A.sha256_file(source)
    stamp = target / "weights.sha256"
    if not (target / "model.onnx").is_file() or not stamp.is_file() or stamp.read_text().strip() != digest:
        served = artifacts / "onnx" / "classifier"
        staging = out / ".fused-classifier"
        shutil.rmtree(staging, ignore_errors=True)
        onnx_export.export_model(artifacts, A.CLASSIFIER, staging)
        heads = json.loads((staging / "config.json").read_text())["n_head"]
        if not fuse.fuse_gpt2_attention(staging / "model.onnx", heads):
            raise RuntimeError(f"{staging / 'model.onnx'}: attention could not be fused")
        for item in served.iterdir():  # the served tokenizer, config and max_length.txt
            if item.is_file() and not item.name.endswith(".onnx"):
                shutil.copy2(item, staging / item.name)
        (staging / "weights.sha256").write_text(digest + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def bench_precision(model_dir: Path, precision: str, texts: list[str], repeats: int, threads: int | None,
                    clock: str, label: str | None = None) -> dict[str, Any]:
    scorer = load_scorer(model_dir, "onnx", "cpu", precision, threads=threads)
    # int8 is served one text per call; its planner row batches anyway, for reference
    batched = load_scorer(model_dir, "onnx", "cpu", precision, threads=threads, batch_size=32) \
        if precision == "int8" else scorer
    lengths = [len(x) for x in scorer.encode(texts)]
    plans = groupings(lengths)
    work: dict[str, Callable[[], int]] = {}
    calls: dict[str, list] = {}
    for name in CONTENDERS[precision]:
        calls[name] = []
        record = calls[name].append

        def hook(rows, padded, real, record=record):
            record((rows, padded, real))

        if name == QUEUE:
            queue_pass(scorer, texts, hook)  # recorded once: the takes vary a little from pass to pass
            work[name] = lambda: queue_pass(scorer, texts)
        else:
            model = batched if name == PLANNED else scorer
            score_pass(model, texts, plans[name], hook)
            work[name] = lambda model=model, plan=plans[name]: score_pass(model, texts, plan)
    rates = race(work, repeats, clock)
    rows = {name: {"ms_per_text": 1000 / rates[name], "raw_ms_per_text": [1000 / r for r in rates["raw"][name]],
                   **padding(calls[name])} for name in work}
    if SORTED in rows:  # the ratio within each round, where other load hit both alike; its median
        for row in rows.values():
            row["paired_vs_sorted"] = statistics.median(
                a / b for a, b in zip(row["raw_ms_per_text"], rows[SORTED]["raw_ms_per_text"]))
    out = {"precision": label or precision, "info": scorer.info(), "rows": rows,
           "tokens": {"mean": statistics.mean(lengths), "median": statistics.median(lengths),
                      "at_max_length": sum(x >= scorer.max_length for x in lengths)}}
    if batched is not scorer:  # how far batching moves an int8 score: why int8 stays one text per call
        alone = np.array(scorer.score(texts))
        together = np.concatenate([batched.score([texts[i] for i in group]) for group, _ in plans[PLANNED]])
        out["int8_batched_max_score_shift"] = float(np.abs(together - alone).max())
    return out


def fit_cost_model(model_dir: Path, texts: list[str], threads: int | None, repeats: int) -> dict[str, Any]:
    """Seconds per fp32 model call (fastest pass) over rows x padded length, and the least-squares
    fit (relative error) of ``c0 + a x rows x length + b x rows x length^2``."""
    scorer = load_scorer(model_dir, "onnx", "cpu", "fp32", threads=threads)
    tokens = [t for ids in scorer.encode(texts) for t in ids]  # real tokens, cut into rows of each length
    tokens *= 1 + GRID_MAX_POSITIONS // len(tokens)
    lengths = sorted({n for n in GRID_LENGTHS if n < scorer.max_length} | {scorer.max_length})
    cells = [(r, n) for r in GRID_ROWS for n in lengths if r * n <= GRID_MAX_POSITIONS]
    ids = {(r, n): [tokens[k * n : (k + 1) * n] for k in range(r)] for r, n in cells}
    each = {c: [list(range(c[0]))] for c in cells}

    def calls_of(cell) -> int:  # a pass: enough calls that a short one is not all timer noise
        calls = max(1, min(20, 4096 // (cell[0] * cell[1])))
        for _ in range(calls):
            scorer.logits_from_ids(ids[cell], each[cell])
        return calls

    rates = race({f"{r}x{n}": (lambda cell=(r, n): calls_of(cell)) for r, n in cells}, repeats, "wall")
    # the fastest pass: other load on the machine only ever adds time to a call
    seconds = np.array([1 / max(rates["raw"][f"{r}x{n}"]) for r, n in cells])
    rows, length = np.array(cells, dtype=float).T
    x = np.stack([np.ones_like(rows), rows * length, rows * length ** 2], axis=1)
    (c0, a, b), *_ = np.linalg.lstsq(x / seconds[:, None], np.ones_like(seconds), rcond=None)
    error = np.abs(x @ [c0, a, b] / seconds - 1)
    fitted = {"call_overhead": max(c0 / a, 0.0), "attention_span": a / b if b > 0 else float("inf")}
    return {"seconds_per_call": {f"{r}x{n}": s for (r, n), s in zip(cells, seconds)},
            "c0_s": c0, "a_s_per_position": a, "b_s": b, "call_overhead_positions": fitted["call_overhead"],
            "attention_span": fitted["attention_span"],
            "fit_median_error": float(np.median(error)), "fit_max_error": float(error.max()),
            "default_plan_excess": default_plan_excess([len(x) for x in scorer.encode(texts)], scorer, fitted)}


def default_plan_excess(lengths: list[int], scorer, fitted: dict[str, float]) -> float:
    """How much more the default constants' plans of arrival-order requests of 16 cost than the
    plans made with the constants fitted here, both priced by the fitted model."""
    def cost(calls):
        return sum(fitted["call_overhead"] + len(c) * (w := max(lengths[i] for i in c)) * (1 + w / fitted["attention_span"])
                   for c in calls)

    def plans(**constants):
        return [[s + i for i in call] for s in range(0, len(lengths), REQUEST)
                for call in plan_calls(lengths[s : s + REQUEST], scorer.batch_size, scorer.max_batch_tokens, **constants)]

    return cost(plans()) / cost(plans(**fitted)) - 1


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, onnxruntime {m['onnxruntime']}; load average at start "
             f"{', '.join(f'{x:.1f}' for x in m['load_average'] or [])}.",
             f"Command: `{report['command']}`; median of {report['repeats']} passes, contenders alternating; "
             f"{report['texts']} payload texts ({report['source']}).", "",
             "| precision | grouping | ms/text | vs length-sorted 16 (fp32) | paired vs length-sorted 16 | calls | "
             "rows/call | padding | padding per call: median / p90 / max |", "|---|---|---|---|---|---|---|---|---|"]
    first = report["precisions"][0]["rows"]
    reference = first.get(SORTED, first.get(ONE))["ms_per_text"]
    for result in report["precisions"]:
        for name, row in result["rows"].items():
            lines.append(f"| {result['precision']} | {name} | {row['ms_per_text']:.2f} | "
                         f"{row['ms_per_text'] / reference:.2f}x | "
                         + (f"{row['paired_vs_sorted']:.2f}x" if "paired_vs_sorted" in row else "-")
                         + f" | {row['calls']} | {row['mean_rows']:.1f} | "
                         f"{row['padding_share']:.1%} | {row['call_padding_median']:.1%} / "
                         f"{row['call_padding_p90']:.1%} / {row['call_padding_max']:.1%} |")
    for result in report["precisions"]:
        t = result["tokens"]
        lines.append(f"\n{result['precision']}: tokens per text mean {t['mean']:.0f}, median {t['median']:.0f}, "
                     f"{t['at_max_length']} at max_length {result['info']['max_length']}; batch_size "
                     f"{result['info']['batch_size']}, max_batch_tokens {result['info']['max_batch_tokens']}, "
                     f"row_workers {result['info']['row_workers']}.")
        if "int8_batched_max_score_shift" in result:
            lines.append(f"int8 planner row for reference only: batched, a score moved by up to "
                         f"{result['int8_batched_max_score_shift']:.4f} against one text per call.")
    if report.get("fit"):
        f = report["fit"]
        lines.append(f"\nCall cost fit (fp32): c0 {f['c0_s'] * 1e6:.0f} us, {f['a_s_per_position'] * 1e6:.2f} us per "
                     f"position, attention term b {f['b_s'] * 1e9:.2f} ns; call overhead = "
                     f"{f['call_overhead_positions']:.0f} positions, attention span = {f['attention_span']:.0f}; "
                     f"fit error median {f['fit_median_error']:.1%}, max {f['fit_max_error']:.1%}. The default "
                     f"constants' plans cost {f['default_plan_excess']:.2%} more than this fit's, priced by it.")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    from export.__main__ import default_data_dir

    ap = argparse.ArgumentParser(prog="python -m export.bench_scoring", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts", help="artifacts directory holding onnx/classifier")
    ap.add_argument("--data-dir", default=default_data_dir(),
                    help="folder holding imdb/test.parquet (default: $GLOWING_DATA_DIR, else ../shared/data)")
    ap.add_argument("--out", default="reports/bench", help="where bench_scoring.json and .md go (default: reports/bench)")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per figure; the median is kept (default: 5)")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ORT's own, all cores)")
    ap.add_argument("--precisions", default="fp32,int8,fp16", help="comma-separated (default: fp32,int8,fp16)")
    ap.add_argument("--before", action="store_true",
                    help="also the scoring graph served before the last-position one (Optimum's export with "
                         "attention fused), fp32, built once into OUT/fused-classifier/ (about 20 s)")
    ap.add_argument("--fit", action="store_true", help="also fit the planner's call cost model (about 1 min)")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return ap


def main(argv: list[str] | None = None) -> int:
    from loadtests.payloads import sample

    args = parser().parse_args(argv)
    logs.configure(args.verbose, quiet=("glowing.runtime",))
    precisions = [p for p in args.precisions.split(",") if p]
    if args.repeats < 1 or not precisions or set(precisions) - set(CONTENDERS):
        log.error("--repeats must be >= 1, --precisions a comma-separated subset of %s", ",".join(CONTENDERS))
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenization on the timed thread, like the model
    model_dir = Path(args.artifacts) / "onnx" / "classifier"
    payloads = sample(Path(args.data_dir) if args.data_dir else None)
    report = {"command": "python -m export.bench_scoring " + " ".join(argv if argv is not None else sys.argv[1:]),
              "repeats": args.repeats, "machine": machine(), "texts": len(payloads["texts"]),
              "source": payloads["source"], "precisions": []}
    started = time.perf_counter()
    try:
        if args.before:  # first: the table's ratios are to its first row's length-sorted figure
            before = fused_classifier(Path(args.artifacts), Path(args.out))
            report["precisions"].append(bench_precision(before, "fp32", payloads["texts"], args.repeats,
                                                        args.threads, "wall", label="fp32, fused (before)"))
            log.info("fp32 before done after %.0f s", time.perf_counter() - started)
        for precision in precisions:
            report["precisions"].append(bench_precision(model_dir, precision, payloads["texts"], args.repeats,
                                                        args.threads, "wall"))
            log.info("%s done after %.0f s", precision, time.perf_counter() - started)
        report["fit"] = fit_cost_model(model_dir, payloads["texts"], args.threads, args.repeats) if args.fit else None
    except ModelFileError as err:
        log.error("%s", err)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    A.write_json_atomic(out / "bench_scoring.json", report)
    table = markdown(report)
    (out / "bench_scoring.md").write_text(table)
    print(table)
    print(f"written: {out / 'bench_scoring.json'}, {out / 'bench_scoring.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

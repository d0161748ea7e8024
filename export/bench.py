"""CPU benchmark of the runtime backends, side by side in one process.

    python -m export.bench --artifacts artifacts --data-dir ../shared/data          # about 2 min, 2 cores
    python -m export.bench --artifacts artifacts --threads 1 --clock cpu            # a shared machine

Classifier: sequences/s of PyTorch fp32, ORT fp32 and ORT int8 at batch sizes 1, 8 and 32 (texts
per call), on real IMDB test reviews long enough to be truncated to exactly 128 and 256 tokens;
each twice: "model" (token ids in, logits out: what Optimum's speed-ups measure) and "end to
end" (``Scorer.score``: texts in, P(positive) out, tokenization included). Generator: new
tokens/s of the runtime's decoding loop on PyTorch and on ORT, and of transformers' ``generate``
as a second PyTorch reference, at batch 1 and 8; prompts = openings of real reviews, sampling
top-k 50 / top-p 0.95, seeded. Every figure is the median of ``--repeats`` passes; contenders take
turns within each repeat, so other load hits them alike. Writes OUT/bench.json (raw passes too)
and OUT/bench.md, and prints the table. Targets: ORT int8 >= 2.5x PyTorch fp32 at batch 32;
ORT generation >= 1.3x PyTorch.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from export.__main__ import default_data_dir
from export.labelled_reviews import ReviewDataError, load_imdb_test
from glowing import artifacts as A
from glowing import logs
from glowing.runtime import ModelFileError, SamplingSettings, load_generator, load_scorer
from glowing.runtime.files import MAX_LENGTH_FILE

log = logging.getLogger("export.bench")
CLF_BACKENDS = [("PyTorch fp32", "torch", "fp32"), ("ORT fp32", "onnx", "fp32"), ("ORT int8", "onnx", "int8")]
LENGTHS, CLF_BATCHES, GEN_BATCHES = (128, 256), (1, 8, 32), (1, 8)
TEXTS_PER_PASS = 64
SAMPLING = {"temperature": 1.0, "top_k": 50, "top_p": 0.95}


def race(work: dict[str, Callable[[], int]], repeats: int, clock: str) -> dict[str, Any]:
    """Median units/s of each ``work`` (a pass returns how many units it did). One warm-up pass
    each, then ``repeats`` rounds in which every contender runs once, in turn."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    rates: dict[str, list[float]] = {name: [] for name in work}
    for fn in work.values():
        fn()
    for _ in range(repeats):
        for name, fn in work.items():
            started = now()
            units = fn()
            rates[name].append(units / max(now() - started, 1e-9))
    return {**{name: statistics.median(r) for name, r in rates.items()}, "raw": rates}


def bench_classifier(artifacts: Path, texts: list[str], repeats: int, threads: int | None, clock: str,
                     lengths: tuple[int, ...] = LENGTHS, per_pass: int = TEXTS_PER_PASS) -> list[dict[str, Any]]:
    rows = []
    for length in lengths:
        if length > _max_length(artifacts):
            log.warning("classifier max_length %d < %d: skipped", _max_length(artifacts), length)
            continue
        dirs = {"onnx": artifacts / "onnx" / "classifier", "torch": artifacts / "classifier"}
        scorers = {name: load_scorer(dirs[backend], backend, "cpu", precision, threads=threads, max_length=length)
                   for name, backend, precision in CLF_BACKENDS}
        pool = [t for t, ids in zip(texts, scorers["ORT fp32"].encode(texts)) if len(ids) >= length]
        if len(pool) < per_pass:
            raise ReviewDataError(f"only {len(pool)} reviews reach {length} tokens; need {per_pass}")
        pool = pool[:per_pass]
        ids = scorers["ORT fp32"].encode(pool)
        for batch in CLF_BATCHES:
            for scope, run in (("model", _logits_all), ("end_to_end", _score_all)):
                inputs = ids if scope == "model" else pool
                work = {name: (lambda s=scorer: run(s, inputs, batch)) for name, scorer in scorers.items()}
                row = {"scope": scope, "max_length": length, "batch": batch, **race(work, repeats, clock)}
                log.info("classifier %s, %d tokens, batch %2d: %s", scope, length, batch,
                         ", ".join(f"{n} {row[n]:.1f} seq/s" for n in scorers))
                rows.append(row)
    return rows


def _logits_all(scorer, ids: list[list[int]], batch: int) -> int:
    for start in range(0, len(ids), batch):
        scorer.logits_from_ids(ids[start : start + batch])
    return len(ids)


def _score_all(scorer, texts: list[str], batch: int) -> int:
    for start in range(0, len(texts), batch):
        scorer.score(texts[start : start + batch])
    return len(texts)


def _max_length(artifacts: Path) -> int:
    return int((artifacts / A.ONNX / A.CLASSIFIER / MAX_LENGTH_FILE).read_text())


def bench_generator(artifacts: Path, texts: list[str], repeats: int, threads: int | None,
                    max_new_tokens: int, clock: str) -> list[dict[str, Any]]:
    gens = {"PyTorch": load_generator(artifacts / "generator", "torch", "cpu", threads=threads),
            "ORT fp32": load_generator(artifacts / "onnx" / "generator", "onnx", "cpu", threads=threads)}
    hf = _HFGenerate(artifacts / "generator")
    prompts = [" ".join(t.split()[:12]) for t in texts[: max(GEN_BATCHES)]]
    rows = []
    for batch in GEN_BATCHES:
        settings = [SamplingSettings(max_new_tokens=max_new_tokens, seed=i, **SAMPLING) for i in range(batch)]
        work = {name: (lambda g=gen: sum(map(len, g.generate_ids(prompts[:batch], settings))))
                for name, gen in gens.items()}
        work["PyTorch HF generate"] = lambda: hf(prompts[:batch], max_new_tokens)
        row = {"batch": batch, "max_new_tokens": max_new_tokens, **race(work, repeats, clock)}
        log.info("generator batch %d: %s", batch, ", ".join(f"{n} {row[n]:.1f} tok/s" for n in work))
        rows.append(row)
    return rows


class _HFGenerate:
    """transformers' own ``generate`` (PyTorch eager, sampling), the usual PyTorch baseline."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def __call__(self, prompts: list[str], max_new_tokens: int) -> int:
        import torch

        from glowing.text import generation_prompt

        enc = self.tok([generation_prompt(p, self.tok.bos_token) for p in prompts], add_special_tokens=False,
                       padding=True, return_tensors="pt")
        torch.manual_seed(0)
        with torch.inference_mode():
            out = self.model.generate(**enc, do_sample=True, max_new_tokens=max_new_tokens, **SAMPLING,
                                      pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id)
        new = out[:, enc["input_ids"].shape[1] :]
        return int(((new != self.tok.pad_token_id) & (new != self.tok.eos_token_id)).sum())


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "avx2": " avx2" in flags, "avx512_vnni": " avx512_vnni" in flags,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_default_threads": torch.get_num_threads(), "onnxruntime": onnxruntime.__version__,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def models(artifacts: Path) -> dict[str, Any]:
    import json

    out = {}
    for kind in ("classifier", "generator"):
        config = json.loads((artifacts / kind / "config.json").read_text())
        out[kind] = {k: config.get(k) for k in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")}
    out["classifier"]["max_length"] = _max_length(artifacts)
    return out


def _manifest_onnx(artifacts: Path) -> dict[str, Any]:
    return A.read_manifest(artifacts).get(A.ONNX, {})


def markdown(report: dict[str, Any]) -> str:
    m, sizes = report["machine"], report["models"]
    clf, gen = sizes["classifier"], sizes["generator"]
    isa = "AVX-512 VNNI" if m["avx512_vnni"] else "AVX2" if m["avx2"] else "no AVX2"
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores ({isa}), torch {m['torch']}, onnxruntime {m['onnxruntime']}; "
             f"load average at start {', '.join(f'{x:.1f}' for x in m['load_average'] or [])}.",
             f"Command: `{report['command']}`; intra-op threads: {report['threads']}; median of {report['repeats']} "
             f"passes; {'CPU time of the process' if report['clock'] == 'cpu' else 'wall-clock time'}; "
             f"int8 = {report['int8_isa']} dynamic quantization, one review per call.", "",
             f"Classifier (GPT-2 {clf['n_layer']} x {clf['n_embd']}, vocab {clf['vocab_size']}, max_length "
             f"{clf['max_length']}), sequences/s; model = token ids in, logits out (as Optimum measures); "
             "end to end = texts in, P(positive) out, tokenization included:", "",
             "| tokens | batch | PyTorch fp32 | ORT fp32 | ORT int8 | int8 / PyTorch (model) "
             "| int8 / PyTorch (end to end) |",
             "|---|---|---|---|---|---|---|"]
    e2e = {(r["max_length"], r["batch"]): r for r in report["classifier"] if r["scope"] == "end_to_end"}
    for r in (r for r in report["classifier"] if r["scope"] == "model"):
        e = e2e[(r["max_length"], r["batch"])]
        lines.append(f"| {r['max_length']} | {r['batch']} | {r['PyTorch fp32']:.0f} / {e['PyTorch fp32']:.0f} | "
                     f"{r['ORT fp32']:.0f} / {e['ORT fp32']:.0f} | {r['ORT int8']:.0f} / {e['ORT int8']:.0f} | "
                     f"**{r['ORT int8'] / r['PyTorch fp32']:.2f}x** | {e['ORT int8'] / e['PyTorch fp32']:.2f}x |")
    lines.append("(cells: model / end to end)")
    lines += ["", f"Generator (GPT-2 {gen['n_layer']} x {gen['n_embd']}, vocab {gen['vocab_size']}), new tokens/s, "
              f"{report['generator'][0]['max_new_tokens'] if report['generator'] else '-'} new tokens per prompt, "
              "top-k 50, top-p 0.95:", "",
              "| batch | PyTorch (runtime loop) | PyTorch (HF generate) | ORT fp32 (runtime loop) | ORT / PyTorch |",
              "|---|---|---|---|---|"]
    for r in report["generator"]:
        lines.append(f"| {r['batch']} | {r['PyTorch']:.1f} | {r['PyTorch HF generate']:.1f} | {r['ORT fp32']:.1f} | "
                     f"**{r['ORT fp32'] / r['PyTorch']:.2f}x** |")
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m export.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts",
                    help="artifacts directory holding the trained models and onnx/ (run `python -m export` first)")
    ap.add_argument("--data-dir", default=default_data_dir(),
                    help="folder holding imdb/test.parquet (default: $GLOWING_DATA_DIR, else ../shared/data)")
    ap.add_argument("--out", default="reports/bench", help="where bench.json and bench.md go (default: reports/bench)")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes per figure; the median is kept (default: 5)")
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads for both torch and ORT (default: each runtime's own, all cores)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: elapsed time (an idle machine); cpu: CPU time of this process, which other "
                         "processes' load does not inflate: use it with --threads 1 on a shared machine")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt (default: 64)")
    ap.add_argument("--lengths", default=",".join(map(str, LENGTHS)),
                    help="comma-separated token lengths the reviews are truncated to (default: 128,256)")
    ap.add_argument("--texts", type=int, default=TEXTS_PER_PASS,
                    help=f"reviews scored per timed pass (default: {TEXTS_PER_PASS})")
    ap.add_argument("--skip-generator", action="store_true", help="classifier only")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.configure(args.verbose, quiet=("glowing.runtime",))
    try:
        lengths = tuple(int(x) for x in args.lengths.split(","))
    except ValueError:
        lengths = ()
    if min(args.repeats, args.max_new_tokens, args.texts) < 1 or not lengths or min(lengths) < 2:
        log.error("--repeats, --max-new-tokens and --texts must be >= 1, --lengths integers >= 2 (e.g. 128,256)")
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenization on the timed thread, like the models
    artifacts = Path(args.artifacts)
    try:
        reviews = load_imdb_test(args.data_dir).sample(2000, 0)
        report = {"command": "python -m export.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "repeats": args.repeats, "clock": args.clock, "threads": args.threads or "runtime default",
                  "int8_isa": _manifest_onnx(artifacts).get("int8_isa", "?"), "machine": machine(),
                  "models": models(artifacts)}
        report["classifier"] = bench_classifier(artifacts, reviews.texts, args.repeats, args.threads, args.clock,
                                                lengths, args.texts)
        report["generator"] = ([] if args.skip_generator else
                               bench_generator(artifacts, reviews.texts, args.repeats, args.threads,
                                               args.max_new_tokens, args.clock))
    except (ReviewDataError, ModelFileError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    A.write_json_atomic(out / "bench.json", report)
    table = markdown(report)
    (out / "bench.md").write_text(table)
    print(table)
    print(f"written: {out / 'bench.json'}, {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

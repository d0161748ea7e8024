"""Decoding speed of the generator, ours against CTranslate2: new tokens/s side by side, in one process.

    python -m export.bench_decode --artifacts artifacts --data-dir ../shared/data --out reports/bench
    python -m export.bench_decode --artifacts artifacts --smoke          # seconds: batch 1 and 2, 8 tokens, 1 pass

Contenders, at batch 1, 8 and 32 (``--batches``), 64 new tokens per row, the same prompts (openings
of IMDB test reviews, ``loadtests.payloads``) encoded once by ``Generator.encode`` so that every
contender starts from the same token ids, the same sampling (top-k 50, top-p 0.95, temperature 1):

- ``before``: what the export served before the rebuilt graph: Optimum's own graph of the same
  weights (exported once into OUT/optimum/), decoded by ``Generator.generate_ids`` with the per-row
  sampler (``sampling.next_tokens_per_row``); ``--no-before`` drops it;
- ``ORT loop``: ``Generator.generate_ids`` on the export's generator (export/decoder_graph.py) with
  the batched sampler; ``engine``: the same model through the serving engine in-process (every row
  submitted, then ``run_until_idle``); ``ORT loop int8``: the export's int8 generator;
- ``CT2 fp32`` / ``CT2 int8``: CTranslate2 (``pip install -e '.[bench]'``) on the same trained
  generator, converted with its Transformers converter into OUT/ct2/ (once per weights file);
  int8 is ``compute_type="int8"`` on the same conversion;
- ``HF generate``: transformers' ``generate`` on PyTorch (``--no-hf`` drops it).

Every contender makes exactly ``--max-new-tokens`` per row (ours ignore end of text; CTranslate2 and
HF are given min = max length); ``--stop-at-eos`` lets ours stop and counts what they return. Every
figure is the median of ``--repeats`` passes in which the contenders take turns
(``export.bench.race``), so other load on the machine hits them alike. ``--threads`` applies to every
runtime (default: all cores). Before timing, a greedy check: the first 20 greedy tokens of 4 prompts
from our loop, CT2 and HF are compared and the agreement printed (identical rows: the conversion kept
the weights; a mismatch is reported, not fatal). After it, the intra-op threads table (ms per ONNX
Runtime decoding call, fp32 and int8, 1 thread vs all cores, with and without spin-waiting), then a
profile of our loop, fp32 and int8, at batch 1, 8 and 32 (``--profile-batches``): time in the ONNX
Runtime call (and inside it, kernel time by operator type, from ORT's own profiler), around it
(feeds, logits copy), in KV-cache select/concat, in sampling, the rest of the Python loop, and what
detokenizing costs, each beside CTranslate2's whole step at the same batch and precision: where a
target is missed, whether the model call alone already takes what CTranslate2's step does. Writes
OUT/bench_decode.json (raw passes too) and OUT/bench_decode.md, and prints both tables. Figures and what they mean:
docs/DECODING.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from export import decode_profile
from export.__main__ import default_data_dir
from export.bench import machine, race
from glowing import artifacts as A
from glowing import logs
from glowing.runtime import Generator, ModelFileError, SamplingSettings, load_generator
from glowing.runtime import generator as generator_module
from glowing.runtime.engine import Engine
from glowing.runtime.files import ONNX_FILES, TORCH_WEIGHTS
from glowing.runtime.sampling import next_tokens_per_row

log = logging.getLogger("export.bench_decode")
SAMPLING = {"temperature": 1.0, "top_k": 50, "top_p": 0.95}
BATCHES, NEW_TOKENS, REPEATS, GREEDY_PROMPTS, GREEDY_TOKENS = (1, 8, 32), 64, 9, 4, 20
BEFORE = "before"  # Optimum's graph with the per-row sampler: what the export served until the rebuilt graph
ENGINE = ("ORT loop",)  # contenders also timed through the serving engine (as "engine", "engine int8"...)
REFERENCE = "CT2 fp32"
CT2_MISSING = "ctranslate2 is not installed: the CTranslate2 rows are skipped (pip install -e '.[bench]')"


def trained_generator_dir(artifacts: Path) -> Path:
    """The trained model the ONNX generator was exported from (finetuned or rl, per the manifest)."""
    from export.onnx_export import source_dir

    choice = A.read_manifest(artifacts).get(A.ONNX, {}).get("generator") or "finetuned"
    return source_dir(artifacts, A.GENERATOR, choice["choice"] if isinstance(choice, dict) else choice)


def convert_ct2(model_dir: Path, cache: Path, pad_token: str) -> Path:
    """``model_dir`` converted by CTranslate2's Transformers converter into ``cache/<weights hash>``
    (reused while the weights are the same). The converter writes ``"unk_token": null`` for our
    tokenizer, which CTranslate2 4.8 refuses to load: it becomes the pad token."""
    import ctranslate2

    out = cache / f"{model_dir.name}-{_weights_digest(model_dir)}"
    if (out / "model.bin").is_file():
        return out
    tmp = cache / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    ctranslate2.converters.TransformersConverter(str(model_dir)).convert(str(tmp), force=True)
    config = json.loads((tmp / "config.json").read_text())
    if config.get("unk_token") is None:
        config["unk_token"] = pad_token
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("CTranslate2 conversion of %s -> %s", model_dir, out)
    return out


class CT2:
    """``ctranslate2.Generator`` fed our prompt token ids (as vocabulary strings)."""

    def __init__(self, path: Path, compute_type: str, vocab: Callable[[int], str], threads: int | None):
        import ctranslate2

        self.generator = ctranslate2.Generator(str(path), device="cpu", compute_type=compute_type,
                                               intra_threads=threads or os.cpu_count() or 1)
        self._vocab = vocab

    def tokens(self, ids: list[list[int]]) -> list[list[str]]:
        return [[self._vocab(t) for t in row] for row in ids]

    def sample(self, prompt_tokens: list[list[str]], new: int, seed: int = 0) -> list[list[int]]:
        import ctranslate2

        ctranslate2.set_random_seed(seed)
        results = self.generator.generate_batch(
            prompt_tokens, max_length=new, min_length=new, include_prompt_in_result=False,
            sampling_topk=SAMPLING["top_k"], sampling_topp=SAMPLING["top_p"],
            sampling_temperature=SAMPLING["temperature"])
        return [r.sequences_ids[0] for r in results]

    def greedy(self, prompt_tokens: list[list[str]], new: int) -> list[list[int]]:
        results = self.generator.generate_batch(prompt_tokens, max_length=new, include_prompt_in_result=False,
                                                sampling_topk=1)
        return [r.sequences_ids[0] for r in results]


class HF:
    """transformers' ``generate`` (PyTorch eager) on the same token ids, left-padded."""

    def __init__(self, model_dir: Path, pad_id: int, eos_id: int | None, threads: int | None):
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        if threads:
            torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        # Only the settings passed to each call: the saved generation config's temperature 0.9 would leak in.
        self.model.generation_config = GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id)
        self.pad_id, self.eos_id = pad_id, eos_id

    def _run(self, ids: list[list[int]], new: int, **kwargs) -> list[list[int]]:
        import torch

        from glowing.runtime.generator import left_pad

        input_ids, mask = left_pad(ids, self.pad_id)
        with torch.inference_mode():
            out = self.model.generate(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
                                      max_new_tokens=new, pad_token_id=self.pad_id, eos_token_id=self.eos_id,
                                      **kwargs)
        return [[t for t in row if t != self.pad_id] for row in out[:, input_ids.shape[1]:].tolist()]

    def sample(self, ids: list[list[int]], new: int, seed: int = 0) -> list[list[int]]:
        import torch

        torch.manual_seed(seed)
        return self._run(ids, new, do_sample=True, min_new_tokens=new, **SAMPLING)

    def greedy(self, ids: list[list[int]], new: int) -> list[list[int]]:
        out = self._run(ids, new, do_sample=False)
        return [row[:row.index(self.eos_id)] if self.eos_id in row else row for row in out]


def engine_ids(gen: Generator, prompts: list[str], settings: list[SamplingSettings]) -> list[list[int]]:
    """Every prompt submitted to one engine (room for all of them), run to the end in this thread."""
    engine = Engine(gen, max_rows=max(len(prompts), 1))
    out: list[list[int]] = [[] for _ in prompts]
    for i, (prompt, s) in enumerate(zip(prompts, settings)):
        engine.submit(prompt, [s], lambda updates, row=out[i]: row.extend(u.token for u in updates
                                                                          if u.token is not None))
    engine.run_until_idle()
    return out


def greedy_check(gen: Generator, peers: dict[str, Any], prompts: list[str], new: int) -> dict[str, Any]:
    """Greedy tokens of our loop vs each peer, one batch of ``prompts``: identical rows per peer."""
    settings = [SamplingSettings(max_new_tokens=new, temperature=0.0)] * len(prompts)
    ours = gen.generate_ids(prompts, settings)
    ids = gen.encode(prompts, settings)[0]
    out: dict[str, Any] = {"prompts": len(prompts), "tokens": new, "ours": ours}
    for name, peer in peers.items():
        theirs = peer.greedy(peer.tokens(ids) if isinstance(peer, CT2) else ids, new)
        same = [a == b for a, b in zip(ours, theirs)]
        first = [next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                 for a, b in zip(ours, theirs)]
        out[name] = {"identical": sum(same), "first_difference": [None if s else f for s, f in zip(same, first)]}
        log.info("greedy %d tokens, ours vs %s: %d/%d prompts identical", new, name, sum(same), len(prompts))
    return out


def prompts_from(data_dir: str | None, n: int) -> tuple[list[str], str]:
    from loadtests.payloads import sample

    payload = sample(Path(data_dir) if data_dir else None)
    prompts = payload["prompts"]
    return [prompts[i % len(prompts)] for i in range(n)], payload["source"]


def profiles(ours: dict[str, Generator], rows: list[dict[str, Any]], prompts: list[str], batches: tuple[int, ...],
             new: int, ort_dir: Path, threads: int | None) -> list[dict[str, Any]]:
    """``decode_profile.profile`` of our loop, fp32 and int8 (when exported), at each of ``batches``, each
    with CTranslate2's whole step at that batch and precision (``ct2_ms_per_step``, from ``rows``)."""
    out = []
    for name, peer in (("ORT loop", "CT2 fp32"), ("ORT loop int8", "CT2 int8")):
        if name not in ours:
            continue
        for batch in batches:
            p = decode_profile.profile(ours[name], prompts[:batch], new, SAMPLING, ort_dir, threads)
            timed = next((r for r in rows if r["batch"] == batch and r.get(peer)), None)
            p["ct2_ms_per_step"] = batch / timed[peer] * 1e3 if timed else None
            out.append(p)
    return out


def bench(ours: dict[str, Generator], peers: dict[str, Any], prompts: list[str], batches: tuple[int, ...],
          new: int, repeats: int, clock: str, engine: tuple[str, ...] = ENGINE) -> list[dict[str, Any]]:
    """Every contender at every batch: ``ours`` through ``Generator.generate_ids`` (the ``before``
    one with the per-row sampler it had), those named in ``engine`` also through the serving engine."""
    first = next(iter(ours.values()))
    rows = []
    for batch in batches:
        some = prompts[:batch]
        settings = [SamplingSettings(max_new_tokens=new, seed=i, **SAMPLING) for i in range(batch)]
        ids = first.encode(some, settings)[0]
        returned: dict[str, list[int]] = {}

        def counted(name: str, fn: Callable[[], list[list[int]]]) -> Callable[[], int]:
            def run() -> int:
                rows_out = fn()
                returned.setdefault(name, []).append(sum(map(len, rows_out)))
                return returned[name][-1]
            return run

        work = {}
        for name, gen in ours.items():
            if name == BEFORE:
                work[name] = counted(name, lambda g=gen: per_row_sampling(g.generate_ids, some, settings))
            else:
                work[name] = counted(name, lambda g=gen: g.generate_ids(some, settings))
            if name in engine:
                label = "engine" + name.removeprefix("ORT loop")
                work[label] = counted(label, lambda g=gen: engine_ids(g, some, settings))
        for name, peer in peers.items():
            inputs = peer.tokens(ids) if isinstance(peer, CT2) else ids
            work[name] = counted(name, lambda p=peer, x=inputs: p.sample(x, new))
        row = {"batch": batch, "max_new_tokens": new, **race(work, repeats, clock),
               "new_tokens_per_row": {k: float(np.mean(v)) / batch for k, v in returned.items()}}
        log.info("batch %2d: %s", batch, ", ".join(f"{n} {row[n]:.0f} tok/s" for n in work))
        rows.append(row)
    return rows


def thread_table(onnx_dir: Path, batches: tuple[int, ...], repeats: int, past: int = 64,
                 calls: int = 20) -> list[dict[str, Any]]:
    """ms per decoding call (ONNX Runtime alone, a cache of ``past`` positions) for fp32 and int8
    at 1 intra-op thread and at all cores, with and without the pool's spin-waiting: one session
    each, taking turns (``race``), so that the choice of ``GLOWING_THREADS`` is measured here."""
    import onnxruntime as ort

    from glowing.runtime.onnx_backend import OnnxCausalLM

    cores = os.cpu_count() or 1
    variants = [(p, t, spin) for p in ("fp32", "int8") if (onnx_dir / ONNX_FILES[p]).is_file()
                for t, spin in ((1, True), (cores, True), (cores, False)) if t > 1 or spin]
    config = json.loads((onnx_dir / "config.json").read_text())
    sessions = {}
    for precision, threads, spin in variants:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = onnx_dir / ONNX_FILES[precision]
        name = f"{precision} {threads}t" + ("" if spin else " no-spin")
        sessions[name] = OnnxCausalLM(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]),
                                      path, config, "")
    heads, head_dim = config["n_head"], config["n_embd"] // config["n_head"]
    past = min(past, (config.get("n_positions") or 1024) - 1)  # the new token's position must exist
    rows = []
    for batch in batches:
        rng = np.random.default_rng(batch)
        cache = [rng.standard_normal((batch, heads, past, head_dim)).astype(np.float32)
                 for _ in range(2 * config["n_layer"])]
        ids = rng.integers(0, config["vocab_size"], (batch, 1))
        mask, positions = np.ones((batch, past + 1), dtype=np.int64), np.full((batch, 1), past, dtype=np.int64)

        def step(lm=None) -> int:
            for _ in range(calls):
                lm.forward(ids, mask, positions, cache)
            return calls

        rates = race({name: (lambda lm=lm: step(lm)) for name, lm in sessions.items()}, repeats, "wall")
        rows.append({"batch": batch, "past": past, **{n: 1000.0 / rates[n] for n in sessions}})
        log.info("threads, batch %2d: %s", batch, ", ".join(f"{n} {rows[-1][n]:.3f} ms" for n in sessions))
    return rows


def per_row_sampling(fn: Callable, *args):
    """``fn(*args)`` with the decoding loop sampling one row at a time, as it did before the
    batched sampler (``sampling.next_tokens_per_row``: the same tokens, the old cost)."""
    original = generator_module.next_tokens
    generator_module.next_tokens = next_tokens_per_row
    try:
        return fn(*args)
    finally:
        generator_module.next_tokens = original


def optimum_graph(model_dir: Path, cache: Path) -> Path:
    """Optimum's own decoding graph of ``model_dir`` (what ``python -m export`` served before it
    rebuilt the graph, export/decoder_graph.py), exported once per weights into ``cache``."""
    import warnings

    from optimum.exporters.onnx import main_export

    from export.onnx_export import TASKS

    out = cache / f"optimum-{_weights_digest(model_dir)}"
    if (out / "model.onnx").is_file():
        return out
    tmp = cache / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(str(model_dir), output=str(tmp), task=TASKS[A.GENERATOR], device="cpu", do_validation=False)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("Optimum's graph of %s -> %s", model_dir, out)
    return out


def _weights_digest(model_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in ("config.json", *TORCH_WEIGHTS):
        if (model_dir / name).is_file():
            digest.update((model_dir / name).read_bytes())
    return digest.hexdigest()[:12]


def markdown(report: dict[str, Any]) -> str:
    m, size = report["machine"], report["model"]
    names = [n for n in report["rows"][0] if n not in ("batch", "max_new_tokens", "raw", "new_tokens_per_row")] \
        if report["rows"] else []
    ref = REFERENCE if REFERENCE in names else None
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, load average at start "
             f"{', '.join(f'{x:.1f}' for x in m['load_average'] or [])}; onnxruntime {m['onnxruntime']}, "
             f"torch {m['torch']}, ctranslate2 {report['ctranslate2'] or 'not installed'}.",
             f"Command: `{report['command']}`; threads: {report['threads']}; median of {report['repeats']} "
             f"alternating passes; {'process CPU time' if report['clock'] == 'cpu' else 'wall-clock time'}.",
             "",
             f"Generator GPT-2 {size['n_layer']} x {size['n_embd']}, vocab {size['vocab_size']}; "
             f"{report['max_new_tokens']} new tokens per row, top-k 50, top-p 0.95, temperature 1.0; prompts: "
             f"{report['prompt_source']}. New tokens/s (ratio to {ref or 'CT2 fp32: not run'}):",
             "", "| batch | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for r in report["rows"]:
        cells = [f"{r[n]:.0f}" + (f" ({r[n] / r[ref]:.2f}x)" if ref else "") for n in names]
        lines.append(f"| {r['batch']} | " + " | ".join(cells) + " |")
    how = ("our rows stop at end of text (--stop-at-eos) and are counted as returned" if report.get("stop_at_eos")
           else "ours too (end of text ignored)")
    if ref and "CT2 int8" in names:
        lines += ["", "int8 against CT2 int8: " + "; ".join(
            f"batch {r['batch']}: " + ", ".join(f"{n} {r[n] / r['CT2 int8']:.2f}x" for n in names if "int8" in n
                                                and n != "CT2 int8") for r in report["rows"])]
    lines += ["", f"New tokens per row, mean over passes (CT2 and HF are forced to the full count; {how}): " +
              "; ".join(f"batch {r['batch']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["new_tokens_per_row"].items())
                        for r in report["rows"])]
    g = report.get("greedy")
    if g:
        lines += ["", f"Greedy check ({g['tokens']} tokens, {g['prompts']} prompts, one batch): " +
                  "; ".join(f"ours vs {k}: {v['identical']}/{g['prompts']} identical"
                            for k, v in g.items() if isinstance(v, dict))]
    if report.get("threads_table"):
        names = [n for n in report["threads_table"][0] if n not in ("batch", "past")]
        lines += ["", f"Intra-op threads: ms per decoding call, ONNX Runtime alone, cache of "
                  f"{report['threads_table'][0]['past']} positions, median of alternating passes (lower is better):",
                  "", "| batch | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {r['batch']} | " + " | ".join(f"{r[n]:.3f}" for n in names) + " |" for r in report["threads_table"]]
    if report.get("profile"):
        lines += ["", decode_profile.markdown(report["profile"])]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m export.bench_decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", default="artifacts", help="artifacts holding generator/ and onnx/generator/")
    ap.add_argument("--data-dir", default=default_data_dir(), help="folder holding imdb/test.parquet for the "
                    "prompts (default: $GLOWING_DATA_DIR, else ../shared/data; built-in prompts when there is none)")
    ap.add_argument("--out", default="reports/bench", help="where bench_decode.json/.md and ct2/ go")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated rows per call (1,8,32)")
    ap.add_argument("--max-new-tokens", type=int, default=NEW_TOKENS, help=f"new tokens per row ({NEW_TOKENS})")
    ap.add_argument("--repeats", type=int, default=REPEATS, help=f"alternating timed passes ({REPEATS})")
    ap.add_argument("--threads", type=int, default=None, help="threads for every runtime (default: all cores)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall", help="wall time, or process CPU time")
    ap.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers' generate")
    ap.add_argument("--no-before", dest="before", action="store_false",
                    help="skip the 'before' contender (Optimum's graph, exported once into OUT/optimum/, with the "
                         "per-row sampler)")
    ap.add_argument("--no-thread-table", dest="thread_table", action="store_false",
                    help="skip the table of ms per decoding call at 1 thread vs all cores (fp32, int8)")
    ap.add_argument("--stop-at-eos", action="store_true",
                    help="let our rows stop at end of text (default: exactly --max-new-tokens per row, like "
                         "CTranslate2 and HF, which are always forced to it)")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profile of our loop")
    ap.add_argument("--profile-batches", default="1,8,32", help="batches the profile runs at, fp32 and int8 "
                    "(1,8,32)")
    ap.add_argument("--smoke", action="store_true", help="batch 1 and 2, 8 new tokens, 1 pass, profile at batch 2")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.configure(args.verbose, quiet=("glowing.runtime",))
    if args.smoke:
        args.batches, args.max_new_tokens, args.repeats, args.profile_batches = "1,2", 8, 1, "2"
    try:
        batches = tuple(int(x) for x in args.batches.split(","))
        profile_batches = tuple(int(x) for x in args.profile_batches.split(",")) if args.profile else ()
    except ValueError:
        batches = ()
    if not batches or min(batches) < 1 or min(args.repeats, args.max_new_tokens) < 1:
        log.error("--batches (e.g. 1,8,32), --profile-batches, --repeats and --max-new-tokens must be integers >= 1")
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    artifacts, out = Path(args.artifacts), Path(args.out)
    greedy_tokens = min(GREEDY_TOKENS, args.max_new_tokens)
    try:
        onnx_dir = artifacts / "onnx" / "generator"
        gen = load_generator(onnx_dir, "onnx", "cpu", threads=args.threads)
        source = trained_generator_dir(artifacts)
        ours = {"ORT loop": gen}
        if (onnx_dir / ONNX_FILES["int8"]).is_file():
            ours["ORT loop int8"] = load_generator(onnx_dir, "onnx", "cpu", "int8", threads=args.threads)
        if args.before:
            ours = {BEFORE: load_generator(optimum_graph(source, out / "optimum"), "onnx", "cpu",
                                           threads=args.threads), **ours}
        if not args.stop_at_eos:  # every row makes exactly --max-new-tokens, as CTranslate2 and HF are made to
            ours = {name: Generator(g.lm, g.codec, n_positions=g.n_positions, eos_ids=set(), info=g.info())
                    for name, g in ours.items()}
        prompts, prompt_source = prompts_from(args.data_dir, max(batches + profile_batches + (GREEDY_PROMPTS,)))
        peers: dict[str, Any] = {}
        try:
            import ctranslate2
            version = ctranslate2.__version__
        except ImportError:
            version = None
            print(CT2_MISSING)
        if version:
            vocab = gen.codec.tokenizer.id_to_token
            path = convert_ct2(source, out / "ct2", vocab(gen.codec.pad_id))
            peers = {"CT2 fp32": CT2(path, "float32", vocab, args.threads),
                     "CT2 int8": CT2(path, "int8", vocab, args.threads)}
        if args.hf:
            peers["HF generate"] = HF(source, gen.codec.pad_id, gen.codec.eos_id, args.threads)
    except (ModelFileError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    config = json.loads((source / "config.json").read_text())
    report: dict[str, Any] = {
        "command": "python -m export.bench_decode " + " ".join(argv if argv is not None else sys.argv[1:]),
        "repeats": args.repeats, "clock": args.clock, "threads": args.threads or "all cores",
        "max_new_tokens": args.max_new_tokens, "machine": machine(), "ctranslate2": version,
        "model": {k: config.get(k) for k in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")},
        "prompt_source": prompt_source, "generator_source": str(source), "stop_at_eos": args.stop_at_eos,
        "graphs": {name: g.info()["model_file"] for name, g in ours.items()}}
    report["greedy"] = greedy_check(gen, peers, prompts[:GREEDY_PROMPTS], greedy_tokens)
    started = time.perf_counter()
    report["rows"] = bench(ours, peers, prompts, batches, args.max_new_tokens, args.repeats, args.clock)
    report["bench_seconds"] = round(time.perf_counter() - started, 1)
    report["threads_table"] = thread_table(onnx_dir, batches, args.repeats) if args.thread_table else []
    report["profile"] = profiles(ours, report["rows"], prompts, profile_batches, args.max_new_tokens,
                                 out / "ort-profile", args.threads)
    out.mkdir(parents=True, exist_ok=True)
    A.write_json_atomic(out / "bench_decode.json", report)
    table = markdown(report)
    (out / "bench_decode.md").write_text(table)
    print(table)
    print(f"written: {out / 'bench_decode.json'}, {out / 'bench_decode.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where the time of our decoding loop goes, per step: for ``python -m export.bench_decode``.

Two views of one ``Generator.generate_ids`` call on the ONNX generator:

- a timer breakdown (the loop's own code, unchanged, run through timing wrappers): the ONNX Runtime
  ``session.run`` call; around it in ``forward`` (building the feeds, copying the last position's
  logits out); KV-cache ``select``/``concat`` (rows leaving the batch); sampling (``next_tokens``:
  top-k/top-p in numpy over the batch); the rest of the Python loop (mask growth, bookkeeping).
  Detokenizing is not part of ``generate_ids``: it is timed after it, as ``Generator.generate``
  does it (one ``decode_batch``) and as streaming does it (``IncrementalDetokenizer``, per token);
- inside ``session.run``: ONNX Runtime's own profiler, kernel time per operator type over the
  decoding steps (the prefill call left out). The export's graph on CPU writes each step's key/value
  into the cache in place (``onnx_backend.SharedCache``); Optimum's graph copies the whole cache into
  a new output every step (its ``Concat``).
"""

from __future__ import annotations

import copy
import json
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from glowing.runtime import Generator, SamplingSettings
from glowing.runtime import generator as generator_module
from glowing.runtime.onnx_backend import SharedCache


class _TimedSession:
    def __init__(self, session, timers: dict[str, float], counts: dict[str, float]):
        self._session, self._timers, self._counts = session, timers, counts

    def run(self, names, feeds):
        started = time.perf_counter()
        outputs = self._session.run(names, feeds)
        self._timers["ort_run"] += time.perf_counter() - started
        self._counts["cache_bytes_out"] += sum(o.nbytes for o in outputs[1:])
        return outputs

    def run_with_iobinding(self, binding):  # a cache written in place (SharedCache): no outputs to count
        started = time.perf_counter()
        self._session.run_with_iobinding(binding)
        self._timers["ort_run"] += time.perf_counter() - started

    def __getattr__(self, name):
        return getattr(self._session, name)


class _TimedLM:
    """The backend's three calls, timed; ``session.run`` inside ``forward`` timed apart."""

    def __init__(self, lm, timers: dict[str, float], counts: dict[str, float]):
        self._lm = copy.copy(lm)
        if hasattr(self._lm, "session"):
            self._lm.session = _TimedSession(lm.session, timers, counts)
        self._timers, self._counts = timers, counts

    def forward(self, *args):
        started = time.perf_counter()
        result = self._lm.forward(*args)
        self._timers["forward"] += time.perf_counter() - started
        self._counts["steps"] += 1
        cache = result[1]
        if isinstance(cache, SharedCache):  # written in place: the step's own key/value only
            b = cache.buffers[0]
            self._counts["cache_bytes_out"] += len(cache.buffers) * b.shape[0] * b.shape[1] * args[0].shape[1] \
                * b.shape[3] * b.itemsize
        return result

    def select(self, *args, **kwargs):
        started = time.perf_counter()
        result = self._lm.select(*args, **kwargs)
        self._timers["cache_select_concat"] += time.perf_counter() - started
        return result

    def concat(self, *args, **kwargs):
        started = time.perf_counter()
        result = self._lm.concat(*args, **kwargs)
        self._timers["cache_select_concat"] += time.perf_counter() - started
        return result


@contextmanager
def _timed_sampler(timers: dict[str, float]) -> Iterator[None]:
    original = generator_module.next_tokens

    def timed(*args):
        started = time.perf_counter()
        result = original(*args)
        timers["sampling"] += time.perf_counter() - started
        return result

    generator_module.next_tokens = timed
    try:
        yield
    finally:
        generator_module.next_tokens = original


def profile(gen: Generator, prompts: list[str], new: int, sampling: dict[str, Any], ort_dir: Path,
            threads: int | None = None) -> dict[str, Any]:
    """Both views at batch ``len(prompts)``, ``new`` tokens per row, seeded sampling."""
    from glowing.runtime.engine import IncrementalDetokenizer

    settings = [SamplingSettings(max_new_tokens=new, seed=i, **sampling) for i in range(len(prompts))]
    timers: dict[str, float] = defaultdict(float)
    counts: dict[str, float] = defaultdict(float)
    timed = Generator(_TimedLM(gen.lm, timers, counts), gen.codec, n_positions=gen.n_positions,
                      eos_ids=gen.eos_ids, info=gen.info())
    gen.generate_ids(prompts, settings)  # warm-up
    with _timed_sampler(timers):
        started = time.perf_counter()
        ids = timed.generate_ids(prompts, settings)
        total = time.perf_counter() - started
    tokens = sum(map(len, ids))

    def detokenize() -> tuple[float, float]:
        started = time.perf_counter()
        gen.codec.tokenizer.decode_batch(ids, skip_special_tokens=True)
        batch_decode = time.perf_counter() - started
        started = time.perf_counter()
        for row in ids:
            detok = IncrementalDetokenizer(gen.codec.tokenizer)
            for token in row:
                detok.add(token)
            detok.finish()
        return batch_decode, time.perf_counter() - started

    detokenize()  # the first calls pay a one-off cost of hundreds of microseconds a token
    batch_decode, incremental = detokenize()
    steps = int(counts["steps"])
    parts = {"ort_run": timers["ort_run"], "around_ort_run": timers["forward"] - timers["ort_run"],
             "cache_select_concat": timers["cache_select_concat"], "sampling": timers["sampling"]}
    parts["python_loop_rest"] = total - sum(parts.values())
    return {"batch": len(prompts), "precision": gen.precision, "max_new_tokens": new, "steps": steps,
            "new_tokens": tokens,
            "total_ms": total * 1e3, "ms_per_step": {k: v * 1e3 / steps for k, v in parts.items()},
            "share": {k: v / total for k, v in parts.items()},
            "cache_mb_written_per_step": counts["cache_bytes_out"] / steps / 2**20,
            "detokenize_us_per_token": {"decode_batch": batch_decode * 1e6 / max(tokens, 1),
                                        "incremental": incremental * 1e6 / max(tokens, 1)},
            "tokens_per_s": tokens / total,
            "ort_ops": ort_operator_profile(gen, prompts, settings, ort_dir, threads)}


def ort_operator_profile(gen: Generator, prompts: list[str], settings: list[SamplingSettings], ort_dir: Path,
                         threads: int | None) -> dict[str, Any]:
    """Kernel time per operator type over the decoding steps (not the prefill), from ORT's profiler."""
    import onnxruntime as ort

    from glowing.runtime.onnx_backend import OnnxCausalLM, shared_kv_graph

    if gen.backend != "onnx":
        return {}
    ort_dir.mkdir(parents=True, exist_ok=True)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(ort_dir / f"decode-{gen.precision}-batch{len(prompts)}")
    if threads:
        options.intra_op_num_threads = threads
    model = shared_kv_graph(gen.model_file) or str(gen.model_file)  # as load_generator runs it on CPU
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    config = json.loads((gen.model_file.parent / "config.json").read_text())
    lm = OnnxCausalLM(session, gen.model_file, config, fix="")
    Generator(lm, gen.codec, n_positions=gen.n_positions, eos_ids=gen.eos_ids, info=gen.info()) \
        .generate_ids(prompts, settings)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    if not runs:
        return {}
    prefill_end = runs[0]["ts"] + runs[0]["dur"]
    by_op: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= prefill_end:
            by_op[e.get("args", {}).get("op_name", "?")] += e["dur"]
    run_us = sum(e["dur"] for e in runs[1:])
    kernel_us = sum(by_op.values())
    top = sorted(by_op.items(), key=lambda kv: -kv[1])
    return {"decode_steps": len(runs) - 1, "run_us_per_step": run_us / max(len(runs) - 1, 1),
            "kernel_share_of_run": kernel_us / max(run_us, 1e-9),
            "op_share_of_kernels": {op: us / max(kernel_us, 1e-9) for op, us in top}}


def markdown(profiles: list[dict[str, Any]]) -> str:
    """The profile table; ``ct2_ms_per_step`` in a profile (bench_decode adds it) is CTranslate2's whole
    step at that batch and precision, from the timed passes: what our ORT call alone is set against."""
    names = {"ort_run": "ORT session.run", "around_ort_run": "feeds + logits copy",
             "cache_select_concat": "KV select/concat", "sampling": "sampling (numpy)",
             "python_loop_rest": "rest of the loop"}
    peer = any(p.get("ct2_ms_per_step") for p in profiles)
    lines = ["Where our loop's time goes (`Generator.generate_ids`, one call, wall clock; ms per decoding step, "
             "share of the call" + ("; CT2 step: CTranslate2's whole step at the same batch and precision, "
                                    "from the timed passes above" if peer else "") + "):", "",
             "| batch | precision | steps | " + " | ".join(names.values()) + (" | CT2 step" if peer else "")
             + " | KV cache written/step | detokenize/token (batch / streaming) |",
             "|---" * (len(names) + 5 + peer) + "|"]
    for p in profiles:
        cells = [f"{p['ms_per_step'][k]:.2f} ({p['share'][k]:.0%})" for k in names]
        if peer:
            cells.append(f"{p['ct2_ms_per_step']:.2f}" if p.get("ct2_ms_per_step") else "-")
        d = p["detokenize_us_per_token"]
        lines.append(f"| {p['batch']} | {p.get('precision', 'fp32')} | {p['steps']} | " + " | ".join(cells) +
                     f" | {p['cache_mb_written_per_step']:.2f} MB | {d['decode_batch']:.1f} / "
                     f"{d['incremental']:.1f} us |")
    for p in profiles:
        ops = p.get("ort_ops")
        if ops:
            kernel_ms = ops["run_us_per_step"] * ops["kernel_share_of_run"] / 1e3
            top = ", ".join(f"{op} {share * kernel_ms:.2f} ms ({share:.0%})"
                            for op, share in list(ops["op_share_of_kernels"].items())[:8])
            lines.append(f"\nInside session.run at batch {p['batch']}, {p.get('precision', 'fp32')} (ORT profiler, "
                         f"{ops['decode_steps']} decoding steps, {ops['run_us_per_step'] / 1e3:.2f} ms/step with "
                         f"profiling on, kernels {ops['kernel_share_of_run']:.0%} of it), kernel time per step: {top}.")
    return "\n".join(lines)

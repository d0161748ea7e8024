"""The models at serving time: a sentiment scorer and a review generator, on ONNX Runtime or PyTorch.

    from glowing.runtime import load_scorer, load_generator, SamplingSettings

    scorer = load_scorer("artifacts/onnx/classifier", backend="onnx", device="auto", precision="int8")
    scorer.score(["A wonderful film.", "Dull."])            # -> [0.97, 0.04]  P(positive), in order
    queue = ScoreQueue(scorer, max_texts=64)                  # zero-wait batching for an asyncio server
    await queue.score(["A wonderful film."])                  # merged with whatever else is queued
    gen = load_generator("artifacts/onnx/generator", backend="onnx", device="auto")
    gen.generate(["This movie"], SamplingSettings(max_new_tokens=64, top_k=50, top_p=0.95, seed=1))

``model_dir`` is the exported ``ARTIFACTS/onnx/{classifier,generator}`` for backend onnx, the
trained ``ARTIFACTS/{classifier,generator}`` for backend torch; an artifacts root works for both.
No HTTP and no environment variables here: the service passes plain values. Importing this
package is cheap; onnxruntime, torch and transformers load with the first model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from glowing.runtime.files import (CLASSIFIER, GENERATOR, DeviceError, ModelFileError, load_codec, read_json,
                                   read_max_length, rebuild_hint, resolve_model_dir)
from glowing.runtime.generator import Generator
from glowing.runtime.sampling import SamplingSettings
from glowing.runtime.score_queue import QueueClosed, ScoreQueue
from glowing.runtime.scorer import MAX_BATCH_TOKENS, Scorer, plan_calls

__all__ = ["load_scorer", "load_generator", "SamplingSettings", "Scorer", "ScoreQueue", "QueueClosed", "plan_calls",
           "Generator", "ModelFileError", "DeviceError", "BACKENDS"]
BACKENDS = ("onnx", "torch")
log = logging.getLogger("glowing.runtime")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose from {', '.join(BACKENDS)}")


def load_scorer(model_dir: str | Path, backend: str = "onnx", device: str = "auto", precision: str = "fp32", *,
                threads: int | None = None, batch_size: int | None = None, max_length: int | None = None,
                max_batch_tokens: int = MAX_BATCH_TOKENS) -> Scorer:
    """A sentiment scorer. ``precision``: fp32, int8 (ONNX, CPU) or fp16 (GPU). ``threads``: threads
    the model uses (None = ONNX Runtime's default, all cores). ``batch_size``: texts per model call (default 32; 1 for int8,
    see below). ``max_batch_tokens``: padded positions (rows x longest text) per model call; the
    texts of one ``score`` call are sorted by length and split into model calls within both limits
    (``plan_calls``). ``max_length`` lowers the truncation length below the model's own.

    int8 runs one text per call: dynamic quantization computes its activation scales over the
    whole input tensor, so in a batch a text's score would move with its partners. Its ``threads``
    then score that many texts at once, one single-threaded call each (measured against one call
    at a time on all threads: docs/EXPORT.md, "Length-aware scoring calls", `make bench-scoring`).
    """
    _check_backend(backend)
    if batch_size is None:
        batch_size = 1 if precision == "int8" else 32
    elif precision == "int8" and batch_size > 1:
        log.warning("int8 with batch_size=%d: scores will depend slightly on their batch partners", batch_size)
    path = resolve_model_dir(model_dir, CLASSIFIER, backend)
    fix = rebuild_hint(path, backend)
    config = read_json(path / "config.json", "the model config", fix)
    codec = load_codec(path, fix, pad_fallback=config.get("pad_token_id"))
    limit = read_max_length(path, config, fix)
    if max_length is not None and not 1 <= max_length <= limit:
        raise ValueError(f"max_length={max_length}: must be between 1 and the model's {limit}")
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens={max_batch_tokens}: must be >= 1")
    workers = 1
    if backend == "onnx":
        from glowing.runtime import onnx_backend as ob

        file = ob.model_file(path, precision, fix)
        if precision == "int8" and batch_size == 1:
            workers = threads or os.cpu_count() or 1
        session = ob.create_session(file, device=device, precision=precision, fix=fix,
                                    threads=1 if workers > 1 else threads)
        forward, providers = ob.OnnxClassifier(session, file, fix), session.get_providers()
    else:
        from glowing.runtime.torch_backend import TorchClassifier

        forward = TorchClassifier(path, device, precision, threads, fix)
        file, providers = path, forward.providers
    positive = (config.get("label2id") or {}).get("positive", 1)
    info = {"backend": backend, "precision": precision, "device": device, "providers": providers,
            "model_file": str(file), "threads": threads}
    return Scorer(forward, codec, max_length=max_length or limit, positive_index=int(positive),
                  batch_size=batch_size, info=info, row_workers=workers, max_batch_tokens=max_batch_tokens)


def load_generator(model_dir: str | Path, backend: str = "onnx", device: str = "auto", precision: str = "fp32", *,
                   threads: int | None = None) -> Generator:
    """A review generator. ``precision``: fp32, int8 (ONNX on CPU: the export's dynamic int8 of the
    decoding graph) or fp16 (GPU)."""
    _check_backend(backend)
    if precision not in ("fp32", "int8", "fp16"):
        raise DeviceError(f"precision={precision!r}: the generator is exported in fp32, int8 (CPU) and fp16")
    if precision == "int8" and backend != "onnx":
        raise DeviceError("precision=int8: the int8 generator is an ONNX export (python -m export); "
                          "use backend=onnx, or fp32 with backend=torch")
    path = resolve_model_dir(model_dir, GENERATOR, backend)
    fix = rebuild_hint(path, backend)
    config = read_json(path / "config.json", "the model config", fix)
    codec = load_codec(path, fix, pad_fallback=config.get("pad_token_id"))
    if backend == "onnx":
        from glowing.runtime import onnx_backend as ob

        file = ob.model_file(path, precision, fix)
        session = ob.create_session(file, device=device, precision=precision, threads=threads, fix=fix,
                                    cpu_graph=ob.shared_kv_graph)
        lm, providers = ob.OnnxCausalLM(session, file, config, fix), session.get_providers()
    else:
        from glowing.runtime.torch_backend import TorchCausalLM

        lm = TorchCausalLM(path, device, precision, threads, fix)
        file, providers = path, lm.providers
    eos = config.get("eos_token_id")
    eos_ids = {codec.eos_id} if codec.eos_id is not None else set()
    eos_ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    n_positions = config.get("n_positions") or config.get("max_position_embeddings") or 1024
    info = {"backend": backend, "precision": precision, "device": device, "providers": providers,
            "model_file": str(file), "threads": threads}
    return Generator(lm, codec, n_positions=int(n_positions), eos_ids=eos_ids, info=info)

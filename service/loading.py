"""Loading the served models from the settings: precision choice, warm-up, and start-up errors
that name the file and the command that builds it (no HTTP, no BentoML here)."""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any, Callable

from glowing import artifacts as A
from glowing.runtime.files import TORCH_WEIGHTS
from service.settings import Settings

log = logging.getLogger("bentoml.glowing")  # under "bentoml": shown by BentoML's logging config


class StartupError(RuntimeError):
    """The service cannot start; the message says which file and which command fixes it."""


def build_hint(settings: Settings) -> str:
    if settings.model_tag:  # the files came from BentoML's model store (service/store.py)
        return (f"the model-store model {settings.model_tag} is incomplete or damaged: `bentoml models delete "
                f"{settings.model_tag}`, then register a good export again (`python -m export.register "
                f"--artifacts ARTIFACTS`) and rebuild the Bento (`make bento`)")
    return (f"`make serve ARTIFACTS={settings.artifacts}` builds whatever is missing "
            f"(`make models`, then `make export`), or set GLOWING_ARTIFACTS to a built artifacts directory")


def read_manifest(settings: Settings) -> dict[str, Any]:
    path = Path(settings.artifacts) / A.MANIFEST
    if not path.is_file():
        raise StartupError(f"{path} is missing: no trained models in {settings.artifacts}; {build_hint(settings)}")
    try:
        return A.read_manifest(settings.artifacts)
    except ValueError as err:
        raise StartupError(f"{err}; {build_hint(settings)}") from err


def model_dir(kind: str, settings: Settings) -> Path:
    """The exact model directory (not the artifacts root: given a root without onnx/, the runtime
    would look for the model in the root itself and blame a missing tokenizer there)."""
    root = Path(settings.artifacts)
    return root / A.ONNX / kind if settings.backend == "onnx" else root / kind


def preflight(settings: Settings) -> list[str]:
    """Check, without loading a model, that every file the service will read is there and intact:
    the manifest, each model's config and tokenizer, and its weights for the chosen precision, with
    ONNX files compared to the sha256 the export recorded. Returns the files checked; raises
    ``StartupError`` naming the first bad one. ``bentoml serve`` runs it once before starting any
    worker, because a worker that fails in ``__init__`` is restarted forever instead of failing."""
    from glowing.runtime.files import (ONNX_FILES, ModelFileError, read_json, rebuild_hint, require_file,
                                       resolve_model_dir)

    manifest = read_manifest(settings)
    recorded = manifest.get(A.ONNX, {}).get("files", {})
    checked = []
    for kind in (A.CLASSIFIER, A.GENERATOR):
        try:
            path = resolve_model_dir(model_dir(kind, settings), kind, settings.backend)
            fix = rebuild_hint(path, settings.backend)
            read_json(path / "config.json", "the model config", fix)
            read_json(path / "tokenizer.json", "the tokenizer", fix)
            if settings.backend == "onnx":
                weights = require_file(path / ONNX_FILES[precision(kind, settings)], "the ONNX model", fix)
            else:
                names = [n for n in TORCH_WEIGHTS if (path / n).is_file()]
                weights = require_file(path / (names[0] if names else TORCH_WEIGHTS[0]), "the weights", fix)
            entry = recorded.get(f"{kind}/{weights.name}") if settings.backend == "onnx" else None
            if entry and (weights.stat().st_size != entry["bytes"] or A.sha256_file(weights) != entry["sha256"]):
                raise ModelFileError(weights, "differs from the file the export recorded in manifest.json "
                                              "(size or sha256): it is truncated or was replaced", fix)
        except ModelFileError as err:
            raise StartupError(f"cannot load the {kind}: {err}; {build_hint(settings)}") from err
        checked.append(str(weights))
    return checked


def _on_cuda(settings: Settings) -> bool:
    if settings.device != "auto":
        return settings.device == "cuda"
    if settings.backend == "onnx":
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    import torch

    return torch.cuda.is_available()


def precision(kind: str, settings: Settings) -> str:
    chosen = settings.classifier_precision if kind == A.CLASSIFIER else settings.generator_precision
    if chosen != "auto":
        return chosen
    # Not int8 on CPU: dynamic quantization scales a batch as a whole, so int8 must score one text
    # per call to keep a text's score independent of its batch, and fp32 is exact (how they compare:
    # `make bench` and `make loadtest`).
    return "fp16" if _on_cuda(settings) else "fp32"


def load(kind: str, settings: Settings):
    """The warmed-up scorer or generator that ``settings`` ask for."""
    from glowing.runtime import DeviceError, ModelFileError, SamplingSettings, load_generator, load_scorer

    read_manifest(settings)  # no manifest: nothing was trained here, say so before any model error
    chosen = precision(kind, settings)
    common = dict(backend=settings.backend, device=settings.device, precision=chosen, threads=settings.model_threads())
    try:
        if kind == A.CLASSIFIER:
            # int8 keeps the runtime's one text per call: batched, its scores would move with the batch
            rows = None if chosen == "int8" else settings.scorer_max_batch_size
            model = load_scorer(model_dir(kind, settings), batch_size=rows,
                                max_batch_tokens=settings.scorer_max_batch_tokens, **common)
            model.score(["A warm-up review: the first call allocates what every later call reuses."])
        else:
            model = load_generator(model_dir(kind, settings), **common)
            model.generate(["This movie"], SamplingSettings(max_new_tokens=2, seed=0))
    except ModelFileError as err:
        raise StartupError(f"cannot load the {kind}: {err}; {build_hint(settings)}") from err
    except DeviceError as err:
        raise StartupError(f"cannot load the {kind} ({settings.backend}, {settings.device}, {chosen}): {err}") from err
    log.info("%s loaded and warmed up: %s", kind, model.info())
    return model


def freeze_heap(on_full_collection: Callable[[float], None] | None = None) -> None:
    """Collect once, then move every object alive at the end of start-up (modules, the model, the app)
    out of the collector's reach (``gc.freeze``), as vLLM's engine does after its start-up. Without it,
    under load a served process ran a full collection about every 0.7 s, each walking that whole heap
    for 80 ms with the GIL held and finding nothing: every request in flight waited it out
    (docs/SERVING.md, "What the processes spend besides the models"). Objects made later are
    collected as before. ``on_full_collection(seconds)``: called after every full (generation 2)
    collection of this process from now on, the one made here included (the metric of those pauses)."""
    global _on_full_collection
    if _on_full_collection in gc.callbacks:  # once per process: a test builds the services again
        gc.callbacks.remove(_on_full_collection)
    _on_full_collection = _full_collection_timer(on_full_collection) if on_full_collection else None
    if _on_full_collection:
        gc.callbacks.append(_on_full_collection)
    gc.collect()
    gc.freeze()


_on_full_collection = None


def _full_collection_timer(report: Callable[[float], None]):
    started = [0.0]

    def callback(phase: str, info: dict) -> None:
        if info["generation"] != 2:  # the cheap, frequent ones: nothing to do
            return
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            report(time.perf_counter() - started[0])

    return callback


def _trained(manifest: dict, kind: str, settings: Settings) -> str | None:
    """How the served model was trained; the export records which generator (fine-tuned or RL) it took."""
    served = manifest.get(A.ONNX, {}).get(kind, {}) if settings.backend == "onnx" else {}
    return served.get("trained") or manifest.get("models", {}).get(kind, {}).get("source")


def describe(kind: str, model, settings: Settings) -> dict[str, Any]:
    """What ``/info`` shows of a loaded model: version, file, precision, the providers really active."""
    info = model.info()
    root = Path(settings.artifacts)
    file = Path(info["model_file"])
    if file.is_dir():  # the torch backend names its model directory
        file = next((file / n for n in TORCH_WEIGHTS if (file / n).is_file()), file)
    rel = file.relative_to(root).as_posix() if file.is_relative_to(root) else file.name
    manifest = A.read_manifest(root)
    onnx_files = manifest.get(A.ONNX, {}).get("files", {})
    entry = onnx_files.get(Path(rel).relative_to(A.ONNX).as_posix()) if rel.startswith(f"{A.ONNX}/") else None
    version = entry["sha256"][:12] if entry else (A.sha256_file(file)[:12] if file.is_file() else None)
    return {"version": version, "file": rel, "backend": info["backend"], "precision": info["precision"],
            "device": info["device"], "providers": list(info["providers"]),
            **{k: info[k] for k in ("max_length", "n_positions", "threads") if k in info},
            "trained": _trained(manifest, kind, settings),
            "exported_at": manifest.get(A.ONNX, {}).get("exported_at") if settings.backend == "onnx" else None}


def engine(generator, settings: Settings, observer):
    """The generator's iteration-level engine, started (its loop runs in a thread of its own)."""
    from glowing.runtime.engine import Engine

    eng = Engine(generator, max_rows=settings.engine_max_rows, max_step_tokens=settings.engine_max_step_tokens,
                 max_waiting=settings.engine_max_waiting, max_waiting_steps=settings.engine_max_waiting_steps,
                 observer=observer)
    eng.start()
    log.info("generator engine started: %s", eng.settings())
    return eng


def score_queue(scorer, settings: Settings, metrics):
    """The scorer's zero-wait queue (it needs the running event loop: made on the first request)."""
    from glowing.runtime.score_queue import ScoreQueue

    def on_call(rows: int, padded_positions: int, real_tokens: int) -> None:
        metrics.batch_size.labels(model="classifier").observe(rows)
        if padded_positions:
            metrics.padding.observe(1 - real_tokens / padded_positions)

    return ScoreQueue(scorer, max_texts=settings.scorer_max_batch_size, on_call=on_call)

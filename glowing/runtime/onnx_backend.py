"""ONNX Runtime backend: a session on the best execution provider, and the two model calls.

Providers: ``device="cuda"`` requires the CUDA provider to be active after the session is
created (onnxruntime-gpu falls back to CPU with only a log line when CUDA or cuDNN is missing:
here that is an error). ``device="auto"`` takes CUDA when the provider is installed and
starts, else CPU with a warning. int8 (dynamic quantization) is the CPU format; fp16 is the
GPU format and runs on CPU too, slower than fp32 there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from glowing.runtime.files import ONNX_FILES, DeviceError, ModelFileError, require_file

log = logging.getLogger("glowing.runtime")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def model_file(model_dir: Path, precision: str, fix: str) -> Path:
    if precision not in ONNX_FILES:
        raise ValueError(f"precision={precision!r}: choose from {', '.join(ONNX_FILES)}")
    return require_file(model_dir / ONNX_FILES[precision], f"the {precision} ONNX model", fix)


def create_session(path: Path, *, device: str, precision: str, threads: int | None, fix: str):
    """An InferenceSession on the providers ``device`` asks for; the active ones are logged."""
    import onnxruntime as ort

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={device!r}: choose from auto, cpu, cuda")
    available = ort.get_available_providers()
    if device == "cuda" and precision == "int8":
        raise DeviceError("precision=int8 is the CPU format (dynamic quantization has no CUDA kernels); "
                          "use precision=fp16 or fp32 on CUDA, or device=cpu")
    if device == "cuda" and CUDA not in available:
        raise DeviceError(f"device=cuda, but this onnxruntime build has no {CUDA} (available: "
                          f"{', '.join(available)}); install onnxruntime-gpu instead of onnxruntime")
    want_cuda = device == "cuda" or (device == "auto" and CUDA in available and precision != "int8")
    if want_cuda and hasattr(ort, "preload_dlls"):
        # CUDA and cuDNN from the nvidia-* pip wheels (onnxruntime-gpu[cuda,cudnn], the GPU Bento) are
        # not on the loader's path: load them first. A no-op on CPU builds and where the libraries
        # come from the system (it then finds nothing to preload).
        ort.preload_dlls()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), sess_options=options,
                                       providers=[CUDA, CPU] if want_cuda else [CPU])
    except Exception as err:  # onnxruntime raises InvalidProtobuf, Fail, InvalidGraph... for a bad file
        raise ModelFileError(path, f"ONNX Runtime cannot load it ({type(err).__name__}: {err})", fix) from err
    active = session.get_providers()
    if want_cuda and CUDA not in active:
        if device == "cuda":
            raise DeviceError(f"device=cuda, but ONNX Runtime fell back to {active} for {path}: check that "
                              "the CUDA and cuDNN libraries onnxruntime-gpu was built for are installed")
        log.warning("%s: the CUDA provider is installed but did not start; running on %s", path, active)
    if precision == "fp16" and CUDA not in active:
        log.warning("%s: fp16 on CPU is slower than fp32 there; fp16 is the GPU format", path)
    log.info("%s: ONNX Runtime providers %s", path, active)
    return session


def _check_io(session, path: Path, required: list[str], what: str, fix: str, cache: bool) -> set[str]:
    """Refuse a graph that is not the model expected (a generator copied over the classifier...)."""
    names = {i.name for i in session.get_inputs()}
    missing = [n for n in required if n not in names]
    if "logits" not in {o.name for o in session.get_outputs()}:
        missing.append("output logits")
    if missing or cache != any(n.startswith("past_key_values.") for n in names):
        raise ModelFileError(path, f"is not {what} (inputs: {', '.join(sorted(names))})", fix)
    return names


class OnnxClassifier:
    """``(input_ids, attention_mask) -> logits`` through an exported text-classification model."""

    def __init__(self, session, path: Path, fix: str):
        self.session = session
        names = _check_io(session, path, ["input_ids", "attention_mask"], "a text-classification model", fix,
                          cache=False)
        self._token_types = "token_type_ids" in names  # BERT-style exports take them too

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._token_types:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        return self.session.run(["logits"], feeds)[0].astype(np.float32, copy=False)


class OnnxCausalLM:
    """The merged decoder exported with ``text-generation-with-past``: one graph, fed an empty
    cache (length 0) on the first step and its own ``present.*`` outputs after that."""

    def __init__(self, session, path: Path, config: dict[str, Any], fix: str):
        self.session = session
        inputs = {i.name: i for i in session.get_inputs()}
        self._past = sorted((n for n in inputs if n.startswith("past_key_values.")),
                            key=lambda n: (int(n.split(".")[1]), n.endswith(".value")))
        if not self._past:
            raise ModelFileError(path, "has no past_key_values inputs: not a causal LM exported with its KV cache "
                                       "(task text-generation-with-past)", fix)
        _check_io(session, path, ["input_ids", "attention_mask"], "a causal language model", fix, cache=True)
        first = inputs[self._past[0]]
        self._dtype = _NUMPY.get(first.type, np.float32)
        heads, head_dim = first.shape[1], first.shape[3]
        if not isinstance(heads, int) or not isinstance(head_dim, int):
            heads, head_dim = config["n_head"], config["n_embd"] // config["n_head"]
        self._head_shape = (heads, head_dim)
        self._positions = "position_ids" in inputs
        self._cache_branch = "use_cache_branch" in inputs  # older Optimum merged decoders
        self._outputs = ["logits"] + [n.replace("past_key_values.", "present.") for n in self._past]

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: list[np.ndarray] | None) -> tuple[np.ndarray, list[np.ndarray]]:
        if past is None:
            past = [np.zeros((len(input_ids), *self._head_shape[:1], 0, self._head_shape[1]), self._dtype)
                    for _ in self._past]
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, **dict(zip(self._past, past))}
        if self._positions:
            feeds["position_ids"] = position_ids
        if self._cache_branch:
            feeds["use_cache_branch"] = np.array([past[0].shape[2] > 0])
        logits, *present = self.session.run(self._outputs, feeds)
        return logits[:, -1, :].astype(np.float32), present

    def select(self, past: list[np.ndarray], rows: np.ndarray, start: int = 0) -> list[np.ndarray]:
        return [p[rows, :, start:] for p in past]

    def concat(self, pasts: list[list[np.ndarray]], pads: list[int]) -> list[np.ndarray]:
        width = max(p[0].shape[2] + pad for p, pad in zip(pasts, pads))
        total = sum(p[0].shape[0] for p in pasts)
        out = []
        for layer in zip(*pasts):
            merged = np.zeros((total, layer[0].shape[1], width, layer[0].shape[3]), dtype=layer[0].dtype)
            row = 0
            for part in layer:
                merged[row : row + part.shape[0], :, width - part.shape[2] :] = part
                row += part.shape[0]
            out.append(merged)
        return out

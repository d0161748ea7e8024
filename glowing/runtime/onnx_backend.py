"""ONNX Runtime backend: a session on the best execution provider, and the two model calls.

Providers: ``device="cuda"`` requires the CUDA provider to be active after the session is
created (onnxruntime-gpu falls back to CPU with only a log line when CUDA or cuDNN is missing:
here that is an error). ``device="auto"`` takes CUDA when the provider is installed and
starts, else CPU with a warning. int8 (dynamic quantization) is the CPU format; fp16 is the
GPU format and runs on CPU too, slower than fp32 there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from glowing.runtime.files import ONNX_FILES, DeviceError, ModelFileError, require_file

log = logging.getLogger("glowing.runtime")
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def model_file(model_dir: Path, precision: str, fix: str) -> Path:
    if precision not in ONNX_FILES:
        raise ValueError(f"precision={precision!r}: choose from {', '.join(ONNX_FILES)}")
    return require_file(model_dir / ONNX_FILES[precision], f"the {precision} ONNX model", fix)


def create_session(path: Path, *, device: str, precision: str, threads: int | None, fix: str,
                   cpu_graph: Callable[[Path], bytes | None] | None = None):
    """An InferenceSession on the providers ``device`` asks for; the active ones are logged.
    ``cpu_graph``: when the session is to run on the CPU provider only, a rewrite of the model to
    load instead of the file (None: the file as it is)."""
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
        model = (cpu_graph(path) if cpu_graph and not want_cuda else None) or str(path)
        session = ort.InferenceSession(model, sess_options=options, providers=[CUDA, CPU] if want_cuda else [CPU])
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


SHARED_LENGTH = "past_sequence_length"
GROW = 64  # positions a shared KV buffer gains when it is full (and holds beyond its rows' width when made)


def shared_kv_graph(path: Path) -> bytes | None:
    """The export's rebuilt decoding graph (export/decoder_graph.py) with ``MultiHeadAttention``'s
    shared past/present buffer wired: a ``past_sequence_length`` input, so that each step writes its
    key/value into the cache in place instead of copying the whole cache into a new output. CPU
    only (on CUDA the same input selects another kernel with another cache layout); None for a
    graph without ``MultiHeadAttention`` (Optimum's), which runs as it is."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:  # the Bentos ship it; without it the graph runs as exported, copying its cache
        log.warning("%s: the onnx package is missing, so the KV cache is copied at every step instead of "
                    "written in place (pip install onnx)", path)
        return None
    model = onnx.load(path)
    attention = [n for n in model.graph.node if n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft"]
    if not attention or any(len(n.input) > 8 and n.input[8] for n in attention) \
            or any(len(n.input) < 8 or not n.input[6] or not n.input[7] for n in attention):
        return None
    model.graph.input.append(helper.make_tensor_value_info(SHARED_LENGTH, TensorProto.INT32, [1]))
    for node in attention:
        del node.input[8:]
        node.input.append(SHARED_LENGTH)
    return model.SerializeToString()


@dataclass
class SharedCache:
    """A KV cache written in place: per layer a key and a value buffer (rows, heads, capacity,
    head_dim) of which the first ``length`` positions hold the cache (left-padded like any other);
    what lies beyond is never read."""

    buffers: list[np.ndarray]
    length: int
    binding: Any = field(default=None, repr=False, compare=False)  # the IO binding these buffers are bound in

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2]


class OnnxCausalLM:
    """The merged decoder exported with ``text-generation-with-past``: one graph, fed an empty
    cache (length 0) on the first step and its own ``present.*`` outputs after that. A graph with
    a ``past_sequence_length`` input (``shared_kv_graph``) keeps its cache in ``SharedCache``
    buffers instead, bound to both its past inputs and present outputs (IO binding)."""

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
        self.shared = SHARED_LENGTH in inputs
        self._vocab = config.get("vocab_size")

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: list[np.ndarray] | SharedCache | None) -> tuple[np.ndarray, list[np.ndarray] | SharedCache]:
        if self.shared:
            return self._forward_shared(input_ids, attention_mask, position_ids, past)
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

    def _forward_shared(self, input_ids, attention_mask, position_ids, past: SharedCache | None):
        import onnxruntime as ort

        rows, new = input_ids.shape
        if past is None:
            past = SharedCache([np.empty((rows, self._head_shape[0], new + GROW, self._head_shape[1]), self._dtype)
                                for _ in self._past], 0)
        elif past.length + new > past.capacity:  # full: a bigger buffer, the cache copied once
            grown = past.length + new + max(GROW, past.capacity // 2)
            buffers = []
            for b in past.buffers:
                bigger = np.empty((b.shape[0], b.shape[1], grown, b.shape[3]), b.dtype)
                bigger[:, :, : past.length] = b[:, :, : past.length]
                buffers.append(bigger)
            past = SharedCache(buffers, past.length)
        binding = past.binding
        if binding is None:  # new buffers: bound once, as past and present, for every step they serve
            binding = self.session.io_binding()
            for name, out, buffer in zip(self._past, self._outputs[1:], past.buffers):
                value = ort.OrtValue.ortvalue_from_numpy(buffer)
                binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_output(out, value)
        # every array bound stays referenced here until the run is over
        feeds = {"input_ids": np.ascontiguousarray(input_ids), "attention_mask": np.ascontiguousarray(attention_mask),
                 SHARED_LENGTH: np.array([past.length], dtype=np.int32)}
        if self._positions:
            feeds["position_ids"] = np.ascontiguousarray(position_ids)
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        logits = np.empty((rows, 1, self._vocab), np.float32)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(binding)
        return logits[:, -1, :], SharedCache(past.buffers, past.length + new, binding)

    def select(self, past: list[np.ndarray] | SharedCache, rows: np.ndarray,
               start: int = 0) -> list[np.ndarray] | SharedCache:
        if isinstance(past, SharedCache):
            width = past.length - start
            buffers = []
            for b in past.buffers:
                kept = np.empty((len(rows), b.shape[1], width + GROW, b.shape[3]), b.dtype)
                kept[:, :, :width] = b[rows, :, start : past.length]
                buffers.append(kept)
            return SharedCache(buffers, width)
        return [p[rows, :, start:] for p in past]

    def concat(self, pasts: list[list[np.ndarray]] | list[SharedCache],
               pads: list[int]) -> list[np.ndarray] | SharedCache:
        if isinstance(pasts[0], SharedCache):
            width = max(p.length + pad for p, pad in zip(pasts, pads))
            total = sum(p.buffers[0].shape[0] for p in pasts)
            buffers = []
            for layer in range(len(pasts[0].buffers)):
                first = pasts[0].buffers[layer]
                merged = np.empty((total, first.shape[1], width + GROW, first.shape[3]), first.dtype)
                merged[:, :, :width] = 0  # masked positions are read (and weighted 0): they must be finite
                row = 0
                for part in pasts:
                    n = part.buffers[layer].shape[0]
                    merged[row : row + n, :, width - part.length : width] = part.buffers[layer][:, :, : part.length]
                    row += n
                buffers.append(merged)
            return SharedCache(buffers, width)
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

"""The deployable variants of an exported model: dynamic int8 for CPU, fp16 for GPU.

* int8: ``ORTQuantizer`` with ``AutoQuantizationConfig.<isa>(is_static=False, per_channel=False)``:
  weights stored as 8-bit integers, activations quantized on the fly (``DynamicQuantizeLinear``
  + ``MatMulInteger``, ``QAttention`` for a fused attention). No CUDA kernels: CPU only.
  ``isa``: ``avx2`` (u8 weights, the safe choice on any x86-64) or ``avx512_vnni`` (s8 weights,
  the VNNI ``vpdpbusd`` kernels). ``auto`` picks avx512_vnni when the CPU has AVX-512 VNNI or
  AVX-VNNI. Measured on the 2-core AMD EPYC of this project (it has AVX-512 VNNI), cpu-preset
  classifier, one review per call: u8/u8 int8 was *slower* than fp32 (1.0 vs 0.7 ms at 128
  tokens), u8/s8 faster (0.6 ms). On a CPU without VNNI, s8 weights can saturate: quantize
  on the kind of machine that serves, or pass ``--int8-isa avx2``.
  Attention products of an unfused graph (activation x activation MatMuls: QK^T and AV) stay
  fp32: quantizing them too moved P(positive) of a tiny GPT-2 classifier by up to 0.33 and
  flipped 5.4% of 2,000 IMDB decisions, against 0.03 and 0.25% with the weight MatMuls alone.
* fp16: ``onnxruntime.transformers.float16`` (ships with onnxruntime; no extra dependency).
  The classifier keeps float32 inputs/outputs; the generator does not, so its KV cache
  travels in fp16 (half the memory traffic per step); the runtime reads the dtype from the graph.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from pathlib import Path

from glowing.runtime.files import ONNX_FILES

QUANTIZED_OPS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul",
                           "QAttention", "QGemm", "MatMulIntegerToFloat", "QuantizeLinear"})


INT8_ISAS = ("auto", "avx2", "avx512_vnni")


def detect_isa() -> str:
    """``avx512_vnni`` when this CPU has VNNI (AVX-512 or AVX), else ``avx2``."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "avx2"
    return "avx512_vnni" if "avx512_vnni" in flags or "avx_vnni" in flags else "avx2"


def quantize_int8(onnx_dir: Path, isa: str = "avx2") -> Path:
    """``onnx_dir/model.onnx`` -> ``onnx_dir/model_quantized.onnx``."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    if isa not in INT8_ISAS[1:]:
        raise ValueError(f"isa={isa!r}: choose from {', '.join(INT8_ISAS[1:])}")
    quantizer = ORTQuantizer.from_pretrained(onnx_dir, file_name=ONNX_FILES["fp32"])
    config = getattr(AutoQuantizationConfig, isa)(is_static=False, per_channel=False,
                                                  nodes_to_exclude=activation_matmuls(onnx_dir / ONNX_FILES["fp32"]))
    with _root_logging(logging.WARNING):  # the ORT quantizer logs one INFO line per tensor on the root logger
        quantizer.quantize(quantization_config=config, save_dir=onnx_dir)
    return onnx_dir / ONNX_FILES["int8"]


def activation_matmuls(path: Path) -> list[str]:
    """Names of the MatMul nodes with no constant operand (attention scores and mixing)."""
    import onnx

    graph = onnx.load(path).graph
    constants = {i.name for i in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    return [node.name for node in graph.node
            if node.op_type == "MatMul" and not any(i in constants for i in node.input)]


@contextlib.contextmanager
def _root_logging(level: int):
    root = logging.getLogger()
    before = root.level
    root.setLevel(max(level, before))
    try:
        yield
    finally:
        root.setLevel(before)


def convert_fp16(onnx_dir: Path, keep_io_types: bool) -> Path:
    """``onnx_dir/model.onnx`` -> ``onnx_dir/model_fp16.onnx``."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(onnx_dir / ONNX_FILES["fp32"]), keep_io_types=keep_io_types)
    path = onnx_dir / ONNX_FILES["fp16"]
    onnx.save(model, path)
    return path


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    return dict(collections.Counter(node.op_type for node in onnx.load(path).graph.node))


def quantized_op_counts(path: Path) -> dict[str, int]:
    """The integer operators in a graph: empty means the quantization did nothing."""
    return {op: n for op, n in sorted(op_counts(path).items()) if op in QUANTIZED_OPS}

"""The deployable variants of an exported model: dynamic int8 for CPU, fp16 for GPU.

* int8: ``ORTQuantizer`` with ``AutoQuantizationConfig.avx2(is_static=False, per_channel=False)``
  (this CPU has AVX2, not AVX-512): weights stored as uint8, activations quantized on the fly
  (``DynamicQuantizeLinear`` + ``MatMulInteger``). No CUDA kernels: CPU only. The attention
  products (activation x activation MatMuls: QK^T and AV) stay fp32: quantizing them too moved
  P(positive) of a tiny GPT-2 classifier by up to 0.33 and flipped 5.4% of 2,000 IMDB decisions,
  against 0.03 and 0.25% with the weight MatMuls alone.
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


def quantize_int8(onnx_dir: Path) -> Path:
    """``onnx_dir/model.onnx`` -> ``onnx_dir/model_quantized.onnx``."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    quantizer = ORTQuantizer.from_pretrained(onnx_dir, file_name=ONNX_FILES["fp32"])
    config = AutoQuantizationConfig.avx2(is_static=False, per_channel=False,
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

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
* the generator's int8 is another kind: weight-only 8-bit blocks with int8 compute per activation
  row (``quantize_generator_int8``), so that its rows stay independent of their batch.
* fp16: ``onnxruntime.transformers.float16`` (ships with onnxruntime; no extra dependency).
  The classifier keeps float32 inputs/outputs; the generator does not, so its KV cache
  travels in fp16 (half the memory traffic per step); the runtime reads the dtype from the graph.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from pathlib import Path

import numpy as np

from glowing.runtime.files import ONNX_FILES

log = logging.getLogger(__name__)

QUANTIZED_OPS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul",
                           "QAttention", "QGemm", "MatMulIntegerToFloat", "QuantizeLinear", "MatMulNBits"})


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


GENERATOR_INT8_BLOCK = 64  # weights per scale, along the input dimension (docs/DECODING.md: 32 vs 64)


def quantize_generator_int8(onnx_dir: Path, block_size: int = GENERATOR_INT8_BLOCK) -> Path:
    """The generator's decoding graph (``export.decoder_graph``) -> ``model_quantized.onnx``: every
    weight ``MatMul`` (QKV, projections, MLP, LM head) becomes ``com.microsoft.MatMulNBits`` with
    8-bit symmetric weights, one scale per ``block_size`` inputs of each output, and
    ``accuracy_level=4``: ORT quantizes each row of the activations to int8 on its own and
    multiplies in integers. Per row, not per tensor as ``DynamicQuantizeLinear`` does: a row's
    logits do not depend on its batch partners, so a seeded request replays exactly in any batch
    the serving engine puts it in (export.parity gates it). Attention, layer norms and the
    embeddings stay fp32. The packing is written here (ORT's own ``MatMulNBitsQuantizer`` needs
    the ``onnx_ir`` package)."""
    import onnx
    from onnx import helper, numpy_helper

    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size}: a power of two >= 16")
    model = onnx.load(onnx_dir / ONNX_FILES["fp32"])
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    nodes, replaced = [], set()
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights or node.input[0] in weights:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(weights[node.input[1]]).astype(np.float32)  # (K, N)
        if w.ndim != 2:
            nodes.append(node)
            continue
        k, n = w.shape
        blocks = -(-k // block_size)
        padded = np.zeros((blocks * block_size, n), dtype=np.float32)
        padded[:k] = w
        per_block = padded.T.reshape(n, blocks, block_size)
        scales = np.abs(per_block).max(axis=-1) / 127.0
        scales[scales == 0] = 1.0
        q = np.clip(np.rint(per_block / scales[..., None]), -127, 127).astype(np.int16) + 128  # zero point 128
        name = node.input[1]
        graph.initializer.extend([numpy_helper.from_array(q.astype(np.uint8), f"{name}.int8"),
                                  numpy_helper.from_array(scales.astype(np.float32), f"{name}.scales")])
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], f"{name}.int8", f"{name}.scales"],
                                      list(node.output), name=f"{node.name or name}.int8", domain="com.microsoft",
                                      K=k, N=n, bits=8, block_size=block_size, accuracy_level=4))
        replaced.add(name)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for node in graph.node for i in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    out = onnx_dir / ONNX_FILES["int8"]
    onnx.save(model, out)
    log.info("generator int8: %d weight products in MatMulNBits (8 bits, block %d)", len(replaced), block_size)
    return out


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

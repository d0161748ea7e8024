"""Replace the GPT-2 classifier's exported attention by ONNX Runtime's fused ``Attention`` operator.

Why: transformers 4.57 exports attention (SDPA) as separate ONNX ops that each sweep a
(batch, heads, tokens, tokens) tensor: the causal mask built with ``Where``, ``Add``, ``Softmax``,
an ``IsNaN``/``Where`` guard. On the cpu-preset classifier (1 layer x 128, 256 tokens) those
took about half of ORT's time, more than the weight products int8 speeds up, and ORT's own
transformer optimizer does not recognise the new export's pattern. ``com.microsoft.Attention``
(causal, key-padding mask from ``attention_mask``) computes the same thing in one kernel, and
dynamic quantization turns it into ``QAttention`` (int8 QKV projection, fp32 attention products).

The fused graph holds a contrib operator: it runs on ORT's CPU and CUDA providers in fp32 and
int8 (CPU). The fp16 variant is converted from the unfused export (plain ONNX ops), see
``export.__main__``. The parity check of every export compares the fused graph with PyTorch.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)
MASK_INT32 = "attention_mask_int32"


def fuse_gpt2_attention(path: Path, num_heads: int) -> int:
    """Rewrite ``path`` in place; returns the number of layers fused (0: pattern not found, file untouched)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(path)
    graph = model.graph
    nodes = {n.name: n for n in graph.node}
    producers = {out: n for n in graph.node for out in n.output}
    weights = {t.name: t for t in graph.initializer}
    if "attention_mask" not in {i.name for i in graph.input}:
        return 0
    fused, replaced = [], {}
    layer = 0
    while (gemm := nodes.get(f"/transformer/h.{layer}/attn/c_attn/Gemm")) is not None:
        out = nodes.get(f"/transformer/h.{layer}/attn/Reshape_3")
        attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
        flat = producers.get(gemm.input[0])
        weight = weights.get(gemm.input[1])
        if (out is None or flat is None or flat.op_type != "Reshape" or weight is None or len(gemm.input) != 3
                or attrs.get("transA", 0) or attrs.get("transB", 0) or attrs.get("alpha", 1.0) != 1.0
                or attrs.get("beta", 1.0) != 1.0 or len(weight.dims) != 2 or weight.dims[1] != 3 * weight.dims[0]):
            log.info("%s: layer %d does not match the GPT-2 attention pattern; attention left unfused", path, layer)
            return 0
        hidden = int(weight.dims[0])
        name = f"/transformer/h.{layer}/attn/Attention"
        fused.append(helper.make_node("Attention", [flat.input[0], gemm.input[1], gemm.input[2], MASK_INT32],
                                      [f"{name}_output_0"], name=name, domain="com.microsoft",
                                      num_heads=num_heads, unidirectional=1))
        # onnx shape inference does not know contrib ops: the quantizer needs this type downstream
        graph.value_info.append(helper.make_tensor_value_info(f"{name}_output_0", TensorProto.FLOAT,
                                                              ["batch_size", "sequence_length", hidden]))
        replaced[out.output[0]] = f"{name}_output_0"
        layer += 1
    if not fused:
        return 0
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in replaced:
                node.input[k] = replaced[name]
    cast = helper.make_node("Cast", ["attention_mask"], [MASK_INT32], name="/attention_mask/Cast", to=TensorProto.INT32)
    _replace_nodes(graph, [cast, *graph.node, *fused])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, path)
    log.info("%s: fused attention in %d layer(s)", path, len(fused))
    return len(fused)


def _replace_nodes(graph, candidates) -> None:
    """Keep the nodes the outputs need (the unfused attention becomes dead), in topological order,
    and the initializers they read."""
    producers = {out: n for n in candidates for out in n.output}
    live, stack = {}, [o.name for o in graph.output]
    while stack:
        node = producers.get(stack.pop())
        if node is not None and id(node) not in live:
            live[id(node)] = node
            stack.extend(node.input)
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    ordered, pending = [], [n for n in candidates if id(n) in live]
    while pending:
        waiting = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise RuntimeError("attention fusion left a cycle or a dangling input in the graph")
        pending = waiting
    used = {i for n in ordered for i in n.input}
    initializers = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(ordered)
    del graph.initializer[:]
    graph.initializer.extend(initializers)

"""The classifier's scoring graph, rebuilt so that its last layer computes one position per text.

Why: the classifier is a causal GPT-2 whose score reads one hidden state per text, the last
non-padding token's (``GPT2ForSequenceClassification``). Its last layer therefore needs every
position's key and value (the pooled token attends to all of them) but its query, attention
output, projection, MLP, final layer norm and score head at that one position only. Optimum's
export (and the fused graph of ``export/fuse.py``) computes them at every position and throws all
but one away: on the cpu preset's one-layer classifier that is most of the arithmetic of a long
review (the MLP and projections of 512 positions, and attention over 512 x 512 scores instead of
512). Earlier layers still run at every position (later ones read them).

The graph written here: the embeddings, layers ``0..n-2`` as in transformers (ORT's fused
``Attention``, causal with the key padding mask, ``SkipLayerNormalization``, ``FastGelu``), then
the last layer's key/value projection at every position, the pooled row gathered (position:
``argmax(arange(L) * (input_ids != pad))``, what transformers computes; ``L - 1`` without a pad
token), and ``MultiHeadAttention`` of that one query over its keys up to the pooled position with
the padding mask. Inputs ``input_ids``, ``attention_mask`` and output ``logits`` (batch, labels)
as Optimum's, so the runtime feeds both alike. Parity with PyTorch: ``export.parity`` (gating) and
tests/test_classifier_graph.py. A checkpoint this builder does not cover keeps the fused graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export import decoder_graph

GRAPH_NAME = "glowing-gpt2-classifier-last-position"


def supported(config: dict) -> str | None:
    """None when ``config`` is a GPT-2 sequence classifier this builder rebuilds, else why not."""
    reason = decoder_graph.supported(config)
    if reason:
        return reason
    if "GPT2ForSequenceClassification" not in (config.get("architectures") or []):
        return f"architectures {config.get('architectures')} is not GPT2ForSequenceClassification"
    return None


def build(model_dir: Path, out: Path) -> bool:
    """Write the scoring graph of the PyTorch checkpoint in ``model_dir`` to ``out``; False (and
    nothing written) when the checkpoint is not one ``supported`` rebuilds."""
    return decoder_graph.rebuild(model_dir, out, supported, _graph, "AutoModelForSequenceClassification",
                                 "the fused Optimum graph")


def is_rebuilt(path: Path) -> bool:
    return decoder_graph.is_rebuilt(path, GRAPH_NAME)


def _graph(config: dict, w: dict[str, np.ndarray]):
    from onnx import TensorProto as T
    from onnx import helper

    layers, hidden, heads = config["n_layer"], config["n_embd"], config["n_head"]
    head_dim = hidden // heads
    labels = w["score.weight"].shape[0]
    scale = 1.0 / np.sqrt(head_dim) if config.get("scale_attn_weights", True) else 1.0
    g = decoder_graph.Builder(config, w)
    const, op = g.const, g.op

    def layer_scale(i: int) -> float:
        return float(scale / (i + 1) if config.get("scale_attn_by_inverse_layer_idx") else scale)

    inputs = [helper.make_tensor_value_info("input_ids", T.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", T.INT64, ["batch_size", "sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", T.FLOAT, ["batch_size", labels])]

    # positions 0..L-1 (transformers numbers them so whatever the mask); the pooled position per row
    zero, one = const("zero", np.array(0, np.int64)), const("one", np.array(1, np.int64))
    axis1 = const("axis1", np.array([1], np.int64))
    shape, = op("Shape", ["input_ids"], ["ids_shape"])
    length, = op("Gather", [shape, one], ["length"], axis=0)
    batch, = op("Gather", [shape, zero], ["batch"], axis=0)
    arange, = op("Range", [zero, length, one], ["arange"])
    places, = op("Gather", [const("wpe", w["wpe.weight"]), arange], ["places"])
    tokens, = op("Gather", [const("wte", w["wte.weight"]), "input_ids"], ["tokens"])
    residual, = op("Add", [tokens, places], ["embedded"])
    mask, = op("Cast", ["attention_mask"], ["mask_int32"], to=T.INT32)
    pad = config.get("pad_token_id")
    if pad is None:  # transformers pools the last position
        weighted, = op("Expand", [arange, shape], ["real_index"])
    else:
        real, = op("Not", [op("Equal", ["input_ids", const("pad_id", np.array(pad, np.int64))], ["is_pad"])[0]],
                   ["is_real"])
        weighted, = op("Mul", [arange, op("Cast", [real], ["is_real_int"], to=T.INT64)[0]], ["real_index"])
    pooled, = op("ArgMax", [weighted], ["pooled"], axis=-1, keepdims=0)  # the first maximum, as torch's argmax
    # keys the pooled query may see: causal (up to the pooled position) and not padding
    pooled_col, = op("Unsqueeze", [pooled, axis1], ["pooled_col"])
    causal, = op("LessOrEqual", [arange, pooled_col], ["pooled_causal"])
    key_mask, = op("Mul", [mask, op("Cast", [causal], ["pooled_causal_int32"], to=T.INT32)[0]], ["pooled_key_mask"])
    # the pooled row's flat index (b * L + position), to gather one position per text
    offsets, = op("Mul", [op("Range", [zero, batch, one], ["rows"])[0], length], ["row_offsets"])
    flat_index, = op("Add", [offsets, pooled], ["pooled_flat"])
    flat_shape = const("flat_shape", np.array([-1, hidden], np.int64))

    normed = g.first_norm(residual)
    for i in range(layers - 1):  # every position: the layers after read them all
        p = f"h.{i}."
        attended, = op("Attention", [normed, const(p + "attn.c_attn.weight", w[p + "attn.c_attn.weight"]),
                                     const(p + "attn.c_attn.bias", w[p + "attn.c_attn.bias"]), mask],
                       [p + "attn"], num_heads=heads, unidirectional=1, scale=layer_scale(i))
        normed, residual = g.project_and_norm(p, attended, residual)
        normed, residual = g.mlp_and_norm(p, normed, residual, f"h.{i + 1}.ln_1")

    # the last layer: keys and values at every position, everything else at the pooled one
    p = f"h.{layers - 1}."
    weight, bias = w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"]
    kv, = op("MatMul", [normed, const(p + "attn.kv.weight", weight[:, hidden:])], [p + "kv"])
    k, v = op("Split", [kv, const(p + "kv.split", np.array([hidden, hidden], np.int64))], [p + "k", p + "v"], axis=-1)

    def pooled_rows(name: str, source: str) -> str:
        flat, = op("Reshape", [source, flat_shape], [name + ".flat"])
        rows, = op("Gather", [flat, flat_index], [name + ".rows"], axis=0)
        return op("Unsqueeze", [rows, axis1], [name])[0]  # (batch, 1, hidden)

    query_in, residual_p = pooled_rows(p + "ln_1.pooled", normed), pooled_rows(p + "residual.pooled", residual)
    q, = op("MatMul", [query_in, const(p + "attn.q.weight", weight[:, :hidden])], [p + "q"])
    attended, = op("MultiHeadAttention", [q, k, v, const(p + "attn.c_attn.bias", bias), key_mask],
                   [p + "attn"], num_heads=heads, scale=layer_scale(layers - 1))
    normed, residual = g.project_and_norm(p, attended, residual_p)
    final, _ = g.mlp_and_norm(p, normed, residual, "ln_f")
    scores, = op("MatMul", [final, const("score.weight.T", w["score.weight"].T)], ["scores"])
    op("Squeeze", [scores, axis1], ["logits"])
    # onnx shape inference does not know contrib ops: the int8 quantizer needs their outputs' types
    typed = [helper.make_tensor_value_info(out, T.FLOAT, None)
             for n in g.nodes if n.domain == "com.microsoft" for out in n.output if out]
    return g.model(GRAPH_NAME, inputs, outputs, "glowing export.classifier_graph", value_info=typed)

"""The generator's decoding graph, rebuilt on ONNX Runtime's fused transformer operators.

Why: Optimum's ``text-generation-with-past`` export of GPT-2 (transformers 4.57) is about 600
nodes for 4 layers (``Shape``/``Gather``/``Unsqueeze``/``Concat`` chains that rebuild the
causal mask and head shapes on every call, attention as separate ``MatMul``/``Softmax``/
``Where`` ops), and ORT's transformer optimizer does not recognise that pattern. A decoding
step of a small model is dominated by the per-node overhead, not by arithmetic: ``python -m
export.bench_decode`` profiles it ("Inside session.run").

The graph written here computes the same function (parity: ``export.parity``, greedy tokens
identical to PyTorch ``generate``) with, per layer, ``SkipLayerNormalization`` (residual add +
layer norm), ``MatMul`` for the weight products, ``com.microsoft.MultiHeadAttention`` (causal,
key padding mask, KV cache in and out) and ``FastGelu``; the LM head runs on the last position
only. Inputs and outputs keep the names and layouts of Optimum's merged decoder (``input_ids``,
``attention_mask``, ``position_ids``, ``past_key_values.{i}.key|value`` (batch, heads, past,
head_dim) -> ``logits`` (batch, 1, vocab), ``present.{i}.key|value``), so the runtime feeds both
alike. It runs on ORT's CPU and CUDA providers; int8 (``export.quantize.quantize_generator_int8``)
is built from it.

Only plain GPT-2 checkpoints are rebuilt (``supported``): another architecture or an option
this builder does not implement keeps Optimum's graph, with a log line saying why.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
GRAPH_NAME = "glowing-gpt2-decoder"
ACTIVATIONS = {"gelu_new": "FastGelu", "gelu_pytorch_tanh": "FastGelu", "gelu": "BiasGelu"}
IR_VERSION = 9  # onnxruntime 1.31 reads IR <= 13; 9 is what opset 17 needs


def supported(config: dict) -> str | None:
    """None when ``config`` is a GPT-2 this builder rebuilds, else the reason it is not."""
    if config.get("model_type") != "gpt2":
        return f"model_type {config.get('model_type')!r} is not gpt2"
    if config.get("activation_function", "gelu_new") not in ACTIVATIONS:
        return f"activation_function {config.get('activation_function')!r} has no fused kernel here"
    if config.get("add_cross_attention"):
        return "cross-attention layers"
    return None


def build(model_dir: Path, out: Path) -> bool:
    """Write the decoding graph of the PyTorch checkpoint in ``model_dir`` to ``out``; False (and
    nothing written) when the checkpoint is not one ``supported`` rebuilds."""
    return rebuild(model_dir, out, supported, _graph, "AutoModelForCausalLM", "Optimum's decoding graph")


def rebuild(model_dir: Path, out: Path, supported, graph, auto_class: str, instead: str) -> bool:
    """``graph(config, weights)`` of the PyTorch checkpoint in ``model_dir``, loaded with transformers'
    ``auto_class``, checked and written to ``out``; False (nothing written, a warning that ``instead``
    is served) when ``supported(config)`` gives a reason not to. Shared with export/classifier_graph.py."""
    config = json.loads((model_dir / "config.json").read_text())
    reason = supported(config)
    if reason:
        log.warning("%s: %s; serving %s", model_dir, reason, instead)
        return False
    save(graph(config, _weights(model_dir, auto_class)), out)
    return True


def save(model, out: Path) -> None:
    """Check ``model`` and write it to ``out`` atomically (a reader never sees half a file)."""
    import onnx

    onnx.checker.check_model(model)
    tmp = out.with_name(f".{out.name}.tmp")
    onnx.save(model, tmp)
    tmp.replace(out)


def _weights(model_dir: Path, auto_class: str) -> dict[str, np.ndarray]:
    """The checkpoint's tensors by transformers' names (``transformer.`` prefix removed), whatever
    the file format (safetensors or pytorch_model.bin), through transformers itself."""
    import torch
    import transformers

    with torch.inference_mode():
        model = getattr(transformers, auto_class).from_pretrained(model_dir, dtype=torch.float32)
        return {k.removeprefix("transformer."): v.detach().cpu().numpy().astype(np.float32)
                for k, v in model.state_dict().items()}


class Builder:
    """The nodes and initializers of a GPT-2 graph being written from its weights ``w`` (transformers'
    names), and the pieces both rebuilt graphs share: this module's decoder and
    export/classifier_graph.py's scorer."""

    CONTRIB = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "FastGelu", "BiasGelu")

    def __init__(self, config: dict, w: dict[str, np.ndarray]):
        self.w = w
        self.eps = float(config.get("layer_norm_epsilon", 1e-5))
        self.activation = ACTIVATIONS[config.get("activation_function", "gelu_new")]
        self.nodes: list = []
        self.initializers: list = []

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def weight(self, name: str) -> str:
        return self.const(name, self.w[name])

    def op(self, op_type: str, inputs: list[str], outputs: list[str], **attrs) -> list[str]:
        from onnx import helper

        domain = "com.microsoft" if op_type in self.CONTRIB else ""
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=outputs[0], domain=domain, **attrs))
        return outputs

    def first_norm(self, embedded: str) -> str:
        """Layer 0's ``ln_1`` (the later ones come with the residual adds, ``mlp_and_norm``)."""
        return self.op("LayerNormalization", [embedded, self.weight("h.0.ln_1.weight"), self.weight("h.0.ln_1.bias")],
                       ["h.0.ln_1"], epsilon=self.eps, axis=-1)[0]

    def project_and_norm(self, p: str, attended: str, residual: str) -> tuple[str, str]:
        """Layer ``p``'s attention projection, then the residual add and ``ln_2`` in one
        ``SkipLayerNormalization`` (the projection's bias with them): ``ln_2``'s output and the new residual."""
        projected, = self.op("MatMul", [attended, self.weight(p + "attn.c_proj.weight")], [p + "attn.out"])
        normed, _, _, residual = self.op(
            "SkipLayerNormalization", [projected, residual, self.weight(p + "ln_2.weight"), self.weight(p + "ln_2.bias"),
                                       self.weight(p + "attn.c_proj.bias")],
            [p + "ln_2", p + "ln_2.mean", p + "ln_2.inv_std", p + "residual.attn"], epsilon=self.eps)
        return normed, residual

    def mlp_and_norm(self, p: str, normed: str, residual: str, next_ln: str) -> tuple[str, str]:
        """Layer ``p``'s MLP, then the residual add and the next layer norm ``next_ln`` (the next
        layer's ``ln_1``, or ``ln_f``): its output and the new residual."""
        up, = self.op("MatMul", [normed, self.weight(p + "mlp.c_fc.weight")], [p + "mlp.up"])
        act, = self.op(self.activation, [up, self.weight(p + "mlp.c_fc.bias")], [p + "mlp.act"])
        down, = self.op("MatMul", [act, self.weight(p + "mlp.c_proj.weight")], [p + "mlp.down"])
        out, _, _, residual = self.op(
            "SkipLayerNormalization", [down, residual, self.weight(next_ln + ".weight"), self.weight(next_ln + ".bias"),
                                       self.weight(p + "mlp.c_proj.bias")],
            [next_ln, next_ln + ".mean", next_ln + ".inv_std", p + "residual.mlp"], epsilon=self.eps)
        return out, residual

    def model(self, name: str, inputs: list, outputs: list, producer: str, value_info: list | None = None):
        from onnx import helper

        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.initializers, value_info=value_info)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)],
                                  producer_name=producer)
        model.ir_version = IR_VERSION
        return model


def _graph(config: dict, w: dict[str, np.ndarray]):
    from onnx import TensorProto as T
    from onnx import helper

    layers, hidden, heads = config["n_layer"], config["n_embd"], config["n_head"]
    head_dim, vocab = hidden // heads, config["vocab_size"]
    g = Builder(config, w)
    const, op = g.const, g.op

    inputs = [helper.make_tensor_value_info("input_ids", T.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", T.INT64, ["batch_size", "total_sequence_length"]),
              helper.make_tensor_value_info("position_ids", T.INT64, ["batch_size", "sequence_length"])]
    outputs = [helper.make_tensor_value_info("logits", T.FLOAT, ["batch_size", 1, vocab])]
    for i in range(layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", T.FLOAT,
                                                        ["batch_size", heads, "past_sequence_length", head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", T.FLOAT,
                                                         ["batch_size", heads, "total_sequence_length", head_dim]))

    tokens, = op("Gather", [const("wte", w["wte.weight"]), "input_ids"], ["tokens"])
    places, = op("Gather", [const("wpe", w["wpe.weight"]), "position_ids"], ["places"])
    residual, = op("Add", [tokens, places], ["embedded"])
    mask, = op("Cast", ["attention_mask"], ["mask_int32"], to=T.INT32)
    normed = g.first_norm(residual)
    scale = 1.0 / np.sqrt(head_dim) if config.get("scale_attn_weights", True) else 1.0
    for i in range(layers):
        p = f"h.{i}."
        qkv, = op("MatMul", [normed, const(p + "attn.c_attn.weight", w[p + "attn.c_attn.weight"])], [p + "qkv"])
        q, k, v = op("Split", [qkv, const(p + "qkv.split", np.array([hidden] * 3, np.int64))],
                     [p + "q", p + "k", p + "v"], axis=-1)
        layer_scale = scale / (i + 1) if config.get("scale_attn_by_inverse_layer_idx") else scale
        attended, _, _ = op("MultiHeadAttention",
                            [q, k, v, const(p + "attn.c_attn.bias", w[p + "attn.c_attn.bias"]), mask, "",
                             f"past_key_values.{i}.key", f"past_key_values.{i}.value"],
                            [p + "attn", f"present.{i}.key", f"present.{i}.value"],
                            num_heads=heads, unidirectional=1, scale=float(layer_scale))
        normed, residual = g.project_and_norm(p, attended, residual)
        normed, residual = g.mlp_and_norm(p, normed, residual, "ln_f" if i == layers - 1 else f"h.{i + 1}.ln_1")
    # The LM head on the last position only: left padding puts every row's newest token there.
    last, = op("Slice", [normed, const("last.start", np.array([-1], np.int64)),
                         const("last.end", np.array([np.iinfo(np.int64).max], np.int64)),
                         const("last.axis", np.array([1], np.int64))], ["last_position"])
    lm_head = w.get("lm_head.weight", w["wte.weight"])  # tied to the embeddings when absent
    op("MatMul", [last, const("lm_head.weight.T", lm_head.T)], ["logits"])
    return g.model(GRAPH_NAME, inputs, outputs, "glowing export.decoder_graph")


def is_rebuilt(path: Path, name: str = GRAPH_NAME) -> bool:
    """Whether ``path`` holds the graph this module (or ``export.classifier_graph``: ``name``) wrote."""
    import onnx

    return onnx.load(path, load_external_data=False).graph.name == name

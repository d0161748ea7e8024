"""Would ragged attention make the serving engine's decoding calls cheaper on CPU? A measurement.

    python -m export.bench_attention --artifacts artifacts          # about 30 s

The engine (glowing/runtime/engine.py) keeps its running rows in cohorts that share one width: a
row pays attention over its cohort's widest history, padding included (``MultiHeadAttention`` with
a key padding mask). ONNX Runtime's ``GroupQueryAttention`` takes each row's own length instead
(``seqlens_k``, a right-padded cache in one shared buffer), which would let every running row sit
in one batch without padding. This builds that graph from the export's decoding graph (per layer,
the QKV bias added, then ``GroupQueryAttention`` on the packed QKV; the LM head on each row's last
real position), checks it (greedy tokens identical to the served graph on 4 prompts, prefill
logits within 1e-4), then times one decoding call, ms (median of ``--repeats``), at each of
``--rows``, 1 intra-op thread:

- ``MHA at w``: the served graph, every row at width w (what a cohort of that width costs);
- ``GQA ragged``: rows of lengths drawn from 10-100 (mean about 55), each attending to its own;
- ``GQA at w``: every row at width w, against ``MHA at w``: the two kernels alike.

Figures and what they decided: docs/SERVING.md ("What is not good enough yet").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from export.bench import machine
from glowing.runtime import SamplingSettings, load_generator
from glowing.runtime.generator import left_pad
from glowing.runtime.onnx_backend import SharedCache


def ragged_graph(path: Path) -> bytes:
    """The export's decoding graph with ``GroupQueryAttention`` in place of ``MultiHeadAttention``:
    inputs ``seqlens_k`` (rows,) int32 = each row's length after this call - 1,
    ``total_sequence_length`` () int32, and ``logits_index`` (rows,) int64 = the flat position
    (row x sequence + column) whose logits each row returns; no attention mask."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(path)
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    hidden = next(init.dims[1] for init in graph.initializer if init.name == "wpe")
    nodes, splits = [], set()
    for node in graph.node:
        if node.op_type == "MultiHeadAttention":
            split = producers[node.input[0]]
            splits.add(split.name)
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            biased = node.name + ".qkv_biased"
            nodes.append(helper.make_node("Add", [split.input[0], node.input[3]], [biased], name=biased))
            nodes.append(helper.make_node(
                "GroupQueryAttention", [biased, "", "", node.input[6], node.input[7], "seqlens_k",
                                        "total_sequence_length"], list(node.output), name=node.name,
                domain="com.microsoft", num_heads=attrs["num_heads"], kv_num_heads=attrs["num_heads"],
                scale=attrs.get("scale", 0.0)))
        elif node.op_type == "Slice" and node.output[0] == "last_position":
            nodes.append(helper.make_node("Reshape", [node.input[0], "flat_shape"], ["flat_hidden"], name="flat"))
            nodes.append(helper.make_node("Gather", ["flat_hidden", "logits_index"], ["last_rows"], axis=0,
                                          name="last_rows"))
            nodes.append(helper.make_node("Unsqueeze", ["last_rows", "last.axis"], ["last_position"],
                                          name="last_position"))
        elif not (node.op_type == "Cast" and node.input[0] == "attention_mask"):
            nodes.append(node)
    nodes = [n for n in nodes if n.name not in splits]
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in nodes for name in n.input}
    kept = [init for init in graph.initializer if init.name in used]  # the splits' sizes, the slice's bounds: gone
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.append(numpy_helper.from_array(np.array([-1, hidden], np.int64), "flat_shape"))
    inputs = [i for i in graph.input if i.name != "attention_mask"]
    del graph.input[:]
    graph.input.extend(inputs + [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch_size"]),
                                 helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
                                 helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["batch_size"])])
    return model.SerializeToString()


class Ragged:
    """Prefill and decoding calls through ``ragged_graph``, the cache in per-layer buffers
    (rows, heads, capacity, head_dim) bound as both past and present."""

    def __init__(self, path: Path, config: dict):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(ragged_graph(path), options, providers=["CPUExecutionProvider"])
        self.heads, self.head_dim = config["n_head"], config["n_embd"] // config["n_head"]
        self.vocab = config["vocab_size"]
        self.past = [f"past_key_values.{i}.{kind}" for i in range(config["n_layer"]) for kind in ("key", "value")]

    def buffers(self, rows: int, capacity: int) -> list[np.ndarray]:
        return [np.zeros((rows, self.heads, capacity, self.head_dim), np.float32) for _ in self.past]

    def run(self, buffers, input_ids, positions, seqlens, total, index) -> np.ndarray:
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, buffer in zip(self.past, buffers):
            value = ort.OrtValue.ortvalue_from_numpy(buffer)
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_key_values.", "present."), value)
        feeds = {"input_ids": input_ids, "position_ids": positions, "seqlens_k": seqlens.astype(np.int32),
                 "total_sequence_length": np.array(total, np.int32), "logits_index": index.astype(np.int64)}
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        logits = np.empty((len(input_ids), 1, self.vocab), np.float32)
        binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(binding)
        return logits[:, 0]

    def prefill(self, prompts: list[list[int]], capacity: int):
        rows, width = len(prompts), max(map(len, prompts))
        ids = np.zeros((rows, width), np.int64)
        lengths = np.array([len(p) for p in prompts])
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = p
        buffers = self.buffers(rows, capacity)
        logits = self.run(buffers, ids, np.broadcast_to(np.arange(width), (rows, width)), lengths - 1, width,
                          np.arange(rows) * width + lengths - 1)
        return logits, buffers, lengths

    def decode(self, buffers, lengths: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        return self.run(buffers, tokens[:, None], lengths[:, None].astype(np.int64), lengths,
                        int(lengths.max()) + 1, np.arange(len(tokens)))


def _median_ms(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1e3)


def check(generator, ragged: Ragged) -> tuple[int, float]:
    """Prompts whose 30 greedy tokens match the served graph's, and the prefill logits' largest gap."""
    prompts = ["This movie", "A wonderful film with a great cast and", "I", "The best thing about this"]
    greedy = SamplingSettings(max_new_tokens=30, temperature=0.0)
    expected = generator.generate_ids(prompts, greedy)
    ids, _ = generator.encode(prompts, [greedy] * len(prompts))
    logits, buffers, lengths = ragged.prefill(ids, generator.n_positions)
    input_ids, mask = left_pad(ids, generator.codec.pad_id)
    served, _ = generator.lm.forward(input_ids, mask, np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1), None)
    gap = float(np.abs(logits - served).max())
    tokens = [[int(t)] for t in logits.argmax(axis=1)]
    for _ in range(29):
        logits = ragged.decode(buffers, lengths, np.array([t[-1] for t in tokens], np.int64))
        lengths = lengths + 1
        for row, token in zip(tokens, logits.argmax(axis=1)):
            row.append(int(token))
    same = sum(e == t[: len(e)] for e, t in zip(expected, tokens))
    return same, gap


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.bench_attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="artifacts holding onnx/generator/")
    parser.add_argument("--rows", default="8,16,48,64", help="comma list of rows per decoding call")
    parser.add_argument("--widths", default="32,100", help="comma list of uniform widths for the MHA/GQA rows")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per figure (median kept)")
    args = parser.parse_args(argv)
    model_dir = args.artifacts / "onnx" / "generator"
    generator = load_generator(model_dir, threads=1)
    if not generator.lm.shared:
        print(f"{model_dir}: not the export's rebuilt decoding graph (MultiHeadAttention); nothing to compare")
        return 1
    import json

    config = json.loads((model_dir / "config.json").read_text())
    ragged = Ragged(model_dir / "model.onnx", config)
    same, gap = check(generator, ragged)
    print(f"{machine()}\nGroupQueryAttention graph: greedy 30 tokens identical to the served graph on {same}/4 "
          f"prompts; prefill logits within {gap:.1e}\n")
    rng = np.random.default_rng(0)
    widths = [int(w) for w in args.widths.split(",")]
    capacity = generator.n_positions

    def mha(rows: int, width: int) -> float:
        past = SharedCache([np.zeros((rows, ragged.heads, width + 64, ragged.head_dim), np.float32)
                            for _ in ragged.past], width)
        mask = np.ones((rows, width + 1), np.int64)
        tokens, positions = rng.integers(0, ragged.vocab, (rows, 1)), np.full((rows, 1), width)

        def call():  # the same step again and again: the cache written at the same position
            past.binding = generator.lm.forward(tokens, mask, positions, SharedCache(past.buffers, width,
                                                                                     past.binding))[1].binding
        return _median_ms(call, args.repeats)

    def gqa(lengths: np.ndarray) -> float:
        buffers = ragged.buffers(len(lengths), capacity)
        tokens = rng.integers(0, ragged.vocab, len(lengths))
        return _median_ms(lambda: ragged.decode(buffers, lengths, tokens), args.repeats)

    header = ["rows", "GQA ragged (mean length)"] + [f"MHA at {w}" for w in widths] + [f"GQA at {w}" for w in widths]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for rows in (int(r) for r in args.rows.split(",")):
        lengths = rng.integers(min(10, capacity // 4), min(101, capacity - 1), rows)  # a tiny model's context too
        cells = [str(rows), f"{gqa(lengths):.2f} ({lengths.mean():.0f})"]
        cells += [f"{mha(rows, w):.2f}" for w in widths] + [f"{gqa(np.full(rows, w)):.2f}" for w in widths]
        print("| " + " | ".join(cells) + " |")
    print("\nms per decoding call, 1 intra-op thread, median of", args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())

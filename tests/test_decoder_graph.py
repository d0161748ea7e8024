"""The generator's rebuilt decoding graph (export/decoder_graph.py) and its int8 variant."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from export import decoder_graph
from export.quantize import op_counts
from glowing.runtime import DeviceError, SamplingSettings, load_generator


def _torch_steps(model_dir, input_ids, mask, steps):
    """Reference: transformers' GPT-2 on the same left-padded batch, then ``steps`` greedy tokens
    fed one at a time through its KV cache; the last position's logits of every call."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids, attention = torch.from_numpy(input_ids), torch.from_numpy(mask)
    positions = torch.from_numpy(np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1))
    out, past, logits = [], None, None
    with torch.inference_mode():
        for step in range(steps + 1):
            result = model(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=past,
                           use_cache=True)
            logits, past = result.logits[:, -1, :], result.past_key_values
            out.append(logits.numpy())
            ids = logits.argmax(-1, keepdim=True)
            attention = torch.cat([attention, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1
    return out


def test_rebuilt_graph_computes_what_pytorch_computes(exported):
    gen = load_generator(exported / "onnx" / "generator", "onnx", "cpu")
    lm = gen.lm
    input_ids = np.array([[1, 1, 1, 5, 9, 12], [3, 4, 5, 6, 7, 8], [1, 1, 1, 1, 1, 20]], dtype=np.int64)
    mask = (np.arange(6)[None, :] >= np.array([[3], [0], [5]])).astype(np.int64)
    reference = _torch_steps(exported / "generator", input_ids, mask, steps=4)
    positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)
    logits, past = lm.forward(input_ids, mask, positions, None)
    for step, expected in enumerate(reference):
        # Left-padded rows: positions of padding are garbage in both; the real rows' logits must agree.
        np.testing.assert_allclose(logits, expected, atol=1e-4, err_msg=f"call {step}")
        token = expected.argmax(-1)[:, None].astype(np.int64)
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        positions = positions[:, -1:] + 1
        logits, past = lm.forward(token, mask, positions, past)


def test_export_serves_the_rebuilt_graph_and_its_int8(exported):
    gen_dir = exported / "onnx" / "generator"
    assert decoder_graph.is_rebuilt(gen_dir / "model.onnx")
    ops = op_counts(gen_dir / "model.onnx")
    assert ops["MultiHeadAttention"] == 1 and "Softmax" not in ops and "Concat" not in ops  # 1 layer, fused
    assert sum(ops.values()) < 40  # Optimum's graph of the same model: hundreds of nodes
    int8_ops = op_counts(gen_dir / "model_quantized.onnx")
    assert int8_ops.get("MatMulNBits") == ops["MatMul"] and "MatMul" not in int8_ops  # every weight product
    assert "DynamicQuantizeLinear" not in int8_ops  # per-row activation quantization, not per batch
    report = json.loads((exported / "onnx" / "parity.json").read_text())
    assert report["generator_graph"] == "fused"
    int8 = report["generator_int8"]
    assert int8["passed"] and int8["perplexity_ratio"] <= 1.02 and int8["tokens"] > 100
    assert 0.5 < int8["greedy_agreement"] <= 1.0
    assert int8["alone_vs_batched_max_abs_diff_fp32"] < 1e-3 and int8["seeded_rows_identical_int8"].endswith("/8")
    assert json.loads((exported / "manifest.json").read_text())["onnx"]["generator_graph"] == "fused"
    # the fp16 variant stays Optimum's plain-op graph (any provider)
    assert not decoder_graph.is_rebuilt(gen_dir / "model_fp16.onnx")


def test_int8_rows_do_not_depend_on_their_batch_partners(exported):
    """MatMulNBits quantizes each activation row on its own: a row's logits are bit for bit the same
    whatever the other rows of a same-shaped batch hold (per-tensor dynamic int8 would move them)."""
    lm = load_generator(exported / "onnx" / "generator", "onnx", "cpu", "int8").lm
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 300, (6, 7)).astype(np.int64)
    mask = np.ones_like(ids)
    positions = np.cumsum(mask, axis=1) - 1
    first, _ = lm.forward(ids, mask, positions, None)
    other = ids.copy()
    other[1:] = rng.integers(5, 300, (5, 7))  # new partners for row 0
    second, _ = lm.forward(other, mask, positions, None)
    assert np.array_equal(first[0], second[0])
    assert not np.array_equal(first[1], second[1])


def test_int8_generator_generates_and_is_onnx_only(exported):
    gen = load_generator(exported / "onnx" / "generator", "onnx", "cpu", "int8")
    assert gen.precision == "int8" and gen.model_file.name == "model_quantized.onnx"
    out = gen.generate_ids(["a great film"] * 2, SamplingSettings(max_new_tokens=6, top_k=5, seed=1))
    assert len(out) == 2 and all(len(x) <= 6 for x in out)
    with pytest.raises(DeviceError, match="int8"):
        load_generator(exported / "generator", "torch", "cpu", "int8")


@pytest.mark.parametrize("change", [{"model_type": "llama"}, {"activation_function": "relu"}])
def test_other_architectures_keep_optimums_graph(exported, tmp_path, change, caplog):
    source = tmp_path / "model"
    shutil.copytree(exported / "generator", source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, **change}))
    out = tmp_path / "model.onnx"
    assert decoder_graph.build(source, out) is False and not out.exists()
    assert "Optimum's decoding graph" in caplog.text


def test_the_cache_written_in_place_gives_the_logits_of_the_copied_one(exported, monkeypatch):
    """On CPU the runtime wires MultiHeadAttention's shared past/present buffer (SharedCache): through
    prefill, growth of the buffer, select (rows leaving, columns cut) and concat (cohorts merging with
    left padding), its logits are bit for bit those of the plain graph, which copies the cache."""
    import onnxruntime as ort

    from glowing.runtime import onnx_backend as ob

    monkeypatch.setattr(ob, "GROW", 1)  # the buffer fills at every step: growth exercised all along
    path = exported / "onnx" / "generator" / "model.onnx"
    config = json.loads((path.parent / "config.json").read_text())
    shared = ob.OnnxCausalLM(ort.InferenceSession(ob.shared_kv_graph(path), providers=["CPUExecutionProvider"]),
                             path, config, "")
    plain = ob.OnnxCausalLM(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), path, config, "")
    assert shared.shared and not plain.shared
    rng = np.random.default_rng(3)

    def prefill(lm, ids, mask):
        return lm.forward(ids, mask, np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1), None)

    def step(lm, past, token, mask, lengths):
        return lm.forward(token[:, None], mask, lengths[:, None], past)

    ids = rng.integers(5, 300, (4, 6)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, :2] = mask[3, :4] = 0
    other = rng.integers(5, 300, (2, 3)).astype(np.int64)
    results = {}
    for name, lm in (("shared", shared), ("plain", plain)):
        out = []
        logits, past = prefill(lm, ids, mask)
        m, lengths = mask, mask.sum(axis=1)
        for _ in range(3):
            m = np.concatenate([m, np.ones((len(m), 1), np.int64)], axis=1)
            logits, past = step(lm, past, logits.argmax(-1), m, lengths)
            lengths = lengths + 1
            out.append(logits)
        keep = np.array([0, 1, 3])  # row 2 leaves; the first columns stay (row 3's padding is narrower)
        past, m, lengths, last = lm.select(past, keep, 0), m[keep], lengths[keep], logits[keep]
        small_logits, small = prefill(lm, other, np.ones_like(other))  # a cohort of 2 narrow rows
        pad = m.shape[1] - other.shape[1]
        past = lm.concat([past, small], [0, pad])
        m = np.concatenate([m, np.pad(np.ones_like(other), ((0, 0), (pad, 0)))])
        lengths = np.concatenate([lengths, np.full(2, other.shape[1])])
        token = np.concatenate([last.argmax(-1), small_logits.argmax(-1)])
        for _ in range(3):
            m = np.concatenate([m, np.ones((len(m), 1), np.int64)], axis=1)
            logits, past = step(lm, past, token, m, lengths)
            lengths, token = lengths + 1, logits.argmax(-1)
            out.append(logits)
        results[name] = out
    for a, b in zip(results["shared"], results["plain"]):
        assert np.array_equal(a, b)


def test_optimums_graph_keeps_the_copied_cache(exported):
    from glowing.runtime import onnx_backend as ob

    assert ob.shared_kv_graph(exported / "onnx" / "generator" / "model_fp16.onnx") is None
    assert load_generator(exported / "onnx" / "generator", "onnx", "cpu").lm.shared  # CPU: the shared buffer


def test_without_the_onnx_package_the_graph_runs_as_exported(exported, monkeypatch, caplog):
    import sys

    from glowing.runtime import onnx_backend as ob

    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now fails
    assert ob.shared_kv_graph(exported / "onnx" / "generator" / "model.onnx") is None
    assert "pip install onnx" in caplog.text

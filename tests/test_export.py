"""ONNX export of the tiny models: files, manifest, parity report, int8 and fp16 graphs, failures."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from export import parity
from export.__main__ import main, parser, run_export
from export.quantize import activation_matmuls, op_counts, quantized_op_counts
from glowing.artifacts import read_manifest, sha256_file
from support import INT8_SAMPLE

MODELS = ["classifier/model.onnx", "classifier/model_quantized.onnx", "classifier/model_fp16.onnx",
          "generator/model.onnx", "generator/model_fp16.onnx"]


def test_export_writes_every_variant_and_records_checksums(exported):
    onnx = exported / "onnx"
    for name in MODELS + ["classifier/max_length.txt", "classifier/tokenizer.json", "generator/tokenizer.json",
                          "parity.json"]:
        assert (onnx / name).is_file(), name
    manifest = read_manifest(exported)
    files = manifest["onnx"]["files"]
    for name in MODELS:
        assert files[name]["sha256"] == sha256_file(onnx / name)
        assert files[name]["bytes"] == (onnx / name).stat().st_size
    assert manifest["onnx"]["tasks"] == {"classifier": "text-classification",
                                         "generator": "text-generation-with-past"}
    assert manifest["metrics"]["export"]["classifier_max_abs_diff_logits"] <= 1e-4
    assert manifest["stages"]["export"]["seconds"] > 0
    assert "classifier" in manifest["models"]  # earlier keys survive the update
    assert not list(exported.glob(".onnx-*")), "the staging folder was not cleaned up"


def test_parity_report_holds_the_issue_thresholds(exported):
    report = json.loads((exported / "onnx" / "parity.json").read_text())
    assert report["passed"]
    clf = report["classifier_logits"]
    assert clf["reviews"] == 64 and clf["padding_share"] > 0.05  # varied lengths, really padded
    assert max(clf["max_abs_diff_same_batches"], clf["max_abs_diff_runtime"]) <= 1e-4 and clf["passed"]
    gen = report["generator_greedy"]
    assert gen["identical_rows"] == gen["prompts"] == 6
    assert len(set(gen["prompt_tokens"])) > 1  # prompts of different lengths: left padding exercised
    assert gen["runtime_torch_identical"] and sum(gen["new_tokens"]) > 0
    int8 = report["int8_accuracy"]
    assert int8["reviews"] == INT8_SAMPLE and abs(int8["delta_points"]) <= 0.5
    assert report["fp16"]["passed"]


def test_generator_is_one_merged_graph_with_the_kv_cache(exported):
    import onnx

    graph = onnx.load(exported / "onnx" / "generator" / "model.onnx").graph
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    assert {"input_ids", "attention_mask", "position_ids", "past_key_values.0.key", "past_key_values.0.value"} <= inputs
    assert {"logits", "present.0.key", "present.0.value"} <= outputs
    assert not list((exported / "onnx" / "generator").glob("decoder_*"))


def test_classifier_serves_the_last_position_graph_and_int8_holds_integer_operators(exported):
    from export import classifier_graph

    clf = exported / "onnx" / "classifier"
    assert classifier_graph.is_rebuilt(clf / "model.onnx")
    fp32 = op_counts(clf / "model.onnx")
    # one layer: its keys and values at every position, one query per text; nothing of the old attention
    assert fp32.get("MultiHeadAttention") == 1 and "Attention" not in fp32 and "Softmax" not in fp32
    assert activation_matmuls(clf / "model.onnx") == []
    ops = quantized_op_counts(clf / "model_quantized.onnx")
    assert ops.get("MatMulInteger", 0) > 0 and ops.get("DynamicQuantizeLinear", 0) > 0
    assert quantized_op_counts(clf / "model.onnx") == {}
    assert (clf / "model_quantized.onnx").stat().st_size < (clf / "model.onnx").stat().st_size
    report = json.loads((exported / "onnx" / "parity.json").read_text())
    assert report["classifier_graph"] == "last-position" and report["classifier_fused_attention_layers"] == 1
    assert json.loads((exported / "manifest.json").read_text())["onnx"]["classifier_graph"] == "last-position"


def test_unfused_graphs_quantize_only_weight_products(tmp_path):
    """Without fusion (another architecture), attention products stay float (see export/quantize.py)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    import numpy as np

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="weights"),
         helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[0, 2, 1]),
         helper.make_node("MatMul", ["h", "ht"], ["logits"], name="scores")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", "s"])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "model.onnx")
    assert activation_matmuls(tmp_path / "model.onnx") == ["scores"]
    from export.quantize import quantize_int8

    quantize_int8(tmp_path)
    counts = op_counts(tmp_path / "model_quantized.onnx")
    assert counts.get("MatMulInteger") == 1 and counts.get("MatMul") == 1


def test_fp16_graphs_are_half_precision(exported):
    import onnx
    from onnx import TensorProto

    gen = onnx.load(exported / "onnx" / "generator" / "model_fp16.onnx").graph
    types = {i.name: i.type.tensor_type.elem_type for i in list(gen.input) + list(gen.output)}
    assert types["past_key_values.0.key"] == TensorProto.FLOAT16 and types["present.0.key"] == TensorProto.FLOAT16
    clf = onnx.load(exported / "onnx" / "classifier" / "model_fp16.onnx").graph
    assert {o.name: o.type.tensor_type.elem_type for o in clf.output}["logits"] == TensorProto.FLOAT  # kept io types
    assert any(t.data_type == TensorProto.FLOAT16 for t in clf.initializer)
    assert not any(n.domain == "com.microsoft" for n in clf.node)  # plain ops: runs on any provider


def test_failed_parity_keeps_the_previous_export(exported, export_data_dir, tmp_path, monkeypatch):
    root = tmp_path / "artifacts"
    shutil.copytree(exported, root)
    before = sha256_file(root / "onnx" / "classifier" / "model.onnx")
    manifest_before = read_manifest(root)["onnx"]
    failing = {"passed": False, "classifier_logits": {"passed": False, "max_abs_diff": 0.5}}
    monkeypatch.setattr(parity, "run_all", lambda *a, **k: failing)
    with pytest.raises(parity.ParityError, match="classifier_logits"):
        run_export(root, str(export_data_dir))
    assert sha256_file(root / "onnx" / "classifier" / "model.onnx") == before
    assert read_manifest(root)["onnx"] == manifest_before
    assert json.loads((root / "onnx.failed" / "parity.json").read_text())["passed"] is False
    assert not list(root.glob(".onnx-*"))


def test_export_without_data_or_models_fails_clearly(tiny_artifacts, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    assert main(["--artifacts", str(tiny_artifacts), "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "imdb/test.parquet" in caplog.text
    caplog.clear()
    assert main(["--artifacts", str(tmp_path / "empty"), "--data-dir", str(tmp_path)]) == 2
    assert "classifier/config.json is missing" in caplog.text and "python -m training" in caplog.text
    assert not (tiny_artifacts / "onnx").exists()


def test_cli_help_explains_every_flag():
    text = parser().format_help()
    for flag in ("--artifacts", "--data-dir", "--int8-sample", "--parity-sample", "--gen-prompts", "--gen-tokens",
                 "--seed"):
        assert flag in text
    assert main(["--artifacts", "x", "--gen-tokens", "0"]) == 2


@pytest.mark.slow
def test_bench_runs_every_contender_and_writes_the_table(exported, export_data_dir, tmp_path):
    from export.bench import main as bench

    out = tmp_path / "bench"
    assert bench(["--artifacts", str(exported), "--data-dir", str(export_data_dir), "--out", str(out),
                  "--repeats", "1", "--lengths", "12", "--texts", "8", "--max-new-tokens", "4"]) == 0
    report = json.loads((out / "bench.json").read_text())
    clf = report["classifier"]
    assert {(r["scope"], r["max_length"], r["batch"]) for r in clf} == {
        (s, 12, b) for s in ("model", "end_to_end") for b in (1, 8, 32)}
    assert all(r[k] > 0 for r in clf for k in ("PyTorch fp32", "ORT fp32", "ORT int8"))
    assert [r["batch"] for r in report["generator"]] == [1, 8]
    assert all(r[k] > 0 for r in report["generator"] for k in ("PyTorch", "ORT fp32", "PyTorch HF generate"))
    table = (out / "bench.md").read_text()
    assert "| tokens | batch | PyTorch fp32 | ORT fp32 | ORT int8 |" in table and "ORT / PyTorch" in table


@pytest.mark.slow
def test_scoring_bench_runs_every_grouping_and_fits_the_cost_model(exported, export_data_dir, tmp_path):
    from export.bench_scoring import CONTENDERS, main as bench_scoring

    out = tmp_path / "bench"
    assert bench_scoring(["--artifacts", str(exported), "--data-dir", str(export_data_dir), "--out", str(out),
                          "--repeats", "1", "--fit", "--before"]) == 0
    report = json.loads((out / "bench_scoring.json").read_text())
    assert [r["precision"] for r in report["precisions"]] == ["fp32, fused (before)", "fp32", "int8", "fp16"]
    from export import classifier_graph
    assert not classifier_graph.is_rebuilt(out / "fused-classifier" / "model.onnx")
    assert (out / "fused-classifier" / "weights.sha256").read_text().strip() == sha256_file(
        exported / "classifier" / "model.safetensors")  # rebuilt when the trained weights change
    assert classifier_graph.is_rebuilt(exported / "onnx" / "classifier" / "model.onnx")
    for result in report["precisions"]:
        assert tuple(result["rows"]) == CONTENDERS[result["precision"].split(",")[0]]
        assert all(row["ms_per_text"] > 0 and 0 <= row["padding_share"] < 1 for row in result["rows"].values())
    rows = report["precisions"][1]["rows"]
    assert rows["one text per call"]["padding_share"] == 0 and rows["one text per call"]["calls"] == 256
    assert rows["arrival 16, one call each (main)"]["calls"] == 16
    assert report["fit"]["call_overhead_positions"] > 0
    assert "| fp32 | arrival 16, planner |" in (out / "bench_scoring.md").read_text()

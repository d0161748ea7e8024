"""``python -m export.bench_decode --smoke`` on the exported tiny generator: it runs, writes its report
and profile, and (where ctranslate2 is installed) converts the model and agrees with our greedy tokens."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import pytest


@pytest.fixture(scope="module")
def smoke(exported, export_data_dir, tmp_path_factory):
    from export.bench_decode import main

    out = tmp_path_factory.mktemp("bench-decode")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["--artifacts", str(exported), "--data-dir", str(export_data_dir), "--out", str(out),
                     "--smoke"]) == 0
    return out, json.loads((out / "bench_decode.json").read_text()), printed.getvalue()


@pytest.mark.slow
def test_smoke_run_writes_the_table_and_the_profile(smoke):
    out, report, printed = smoke
    assert [r["batch"] for r in report["rows"]] == [1, 2]
    for row in report["rows"]:
        for name in ("before", "ORT loop", "engine", "ORT loop int8", "HF generate"):
            assert row[name] > 0, name
            assert row["new_tokens_per_row"][name] == 8, name  # every contender forced to the full count
    # before = Optimum's own graph, exported by the benchmark; ours = the export's rebuilt graph and its int8
    assert "optimum" in report["graphs"]["before"] and report["graphs"]["ORT loop"].endswith("generator/model.onnx")
    assert report["graphs"]["ORT loop int8"].endswith("generator/model_quantized.onnx")
    assert report["greedy"]["HF generate"]["identical"] == report["greedy"]["prompts"]
    assert [(p["precision"], p["batch"]) for p in report["profile"]] == [("fp32", 2), ("int8", 2)]
    peers = "CT2 fp32" in report["rows"][0]
    for profile in report["profile"]:
        assert profile["steps"] >= 1 and profile["new_tokens"] == 2 * 8  # end of text ignored, as in the passes
        assert sum(profile["share"].values()) == pytest.approx(1.0)
        assert profile["ort_ops"]["op_share_of_kernels"]  # ORT's profiler saw the decoding steps
        peer = report["rows"][1]["CT2 " + profile["precision"]] if peers else None
        # CTranslate2's whole step at that batch and precision, beside ours (none without ctranslate2)
        assert profile["ct2_ms_per_step"] == (pytest.approx(2 / peer * 1e3) if peers else None)
    table = (out / "bench_decode.md").read_text()
    assert "| batch | before | ORT loop | engine | ORT loop int8 |" in table and "Where our loop's time goes" in table
    assert "| 2 | int8 |" in table and "Inside session.run at batch 2, int8" in table
    assert table in printed


@pytest.mark.slow
def test_ctranslate2_converts_the_model_and_agrees_with_ours(smoke):
    _, report, printed = smoke
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        assert "pip install -e '.[bench]'" in printed and "CT2 fp32" not in report["rows"][0]
        pytest.skip("ctranslate2 is not installed (pip install -e '.[bench]'): only the skip message was checked")
    assert report["greedy"]["CT2 fp32"]["identical"] == report["greedy"]["prompts"]
    for row in report["rows"]:
        assert row["CT2 fp32"] > 0 and row["CT2 int8"] > 0
        assert row["new_tokens_per_row"]["CT2 fp32"] == 8  # min_length = max_length


@pytest.mark.slow
def test_stop_at_eos_counts_the_tokens_returned(exported, export_data_dir, tmp_path):
    from export.bench_decode import main

    assert main(["--artifacts", str(exported), "--data-dir", str(export_data_dir), "--out", str(tmp_path),
                 "--smoke", "--no-hf", "--no-profile", "--no-before", "--stop-at-eos"]) == 0
    report = json.loads((tmp_path / "bench_decode.json").read_text())
    assert report["stop_at_eos"] and "before" not in report["rows"][0]
    assert all(0 < r["new_tokens_per_row"]["ORT loop"] <= 8 for r in report["rows"])


@pytest.mark.slow
def test_without_ctranslate2_the_ct2_rows_are_skipped_with_the_install_command(exported, export_data_dir, tmp_path,
                                                                               monkeypatch, capsys):
    from export.bench_decode import main

    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # `import ctranslate2` now fails
    assert main(["--artifacts", str(exported), "--data-dir", str(export_data_dir), "--out", str(tmp_path),
                 "--smoke", "--no-hf", "--no-profile"]) == 0
    assert "pip install -e '.[bench]'" in capsys.readouterr().out
    report = json.loads((tmp_path / "bench_decode.json").read_text())
    assert report["ctranslate2"] is None and [n for n in report["rows"][0] if n.startswith("CT2")] == []

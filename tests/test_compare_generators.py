"""loadtests.compare_generators: /reviews against a real `bentoml serve` of the tiny exported models."""

import json

import pytest

from loadtests.compare_generators import main


@pytest.mark.slow
def test_compare_reports_acceptance_and_candidates(exported, tmp_path):
    out = tmp_path / "cmp"
    assert main([f"finetuned={exported}", "--prompts", "2", "--data-dir", str(tmp_path / "none"),
                 "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    result = summary["results"]["finetuned"]
    assert result["requests"] == 2 and len(result["rows"]) == 2
    assert 1 <= result["candidates_per_request"] <= summary["settings"]["max_candidates"]
    rows = result["rows"]
    assert result["acceptance_rate"] == pytest.approx(sum(r["accepted"] for r in rows) /
                                                      sum(r["candidates"] for r in rows))
    assert result["served_generator"]["trained"]  # /info says which generator answered
    assert "| finetuned |" in (out / "report.md").read_text()


def test_compare_refuses_a_directory_without_an_export(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([f"rl={tmp_path}"])
    assert exit_info.value.code == 2
    assert "expected NAME=DIR with an exported DIR/onnx" in capsys.readouterr().err

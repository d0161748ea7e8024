"""The load test can't rot: ``python -m loadtests.run --smoke`` against the exported tiny models
(one scenario, users 1 and 4, 5 s steps; about 45 s on 2 CPU cores), plus the report's arithmetic.

Locust runs only as its own CLI process (``loadtests.run`` starts it): importing it here, next to
ssl/httpx, would die in gevent's monkey-patching."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from export_fixtures import export_data_dir, exported  # noqa: F401  (fixtures)
from loadtests import payloads, report

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_the_report(exported, export_data_dir, tmp_path):
    out = tmp_path / "loadtest"
    proc = subprocess.run([sys.executable, "-m", "loadtests.run", "--smoke", "--artifacts", str(exported),
                           "--data-dir", str(export_data_dir), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for name in ("report.md", "throughput.png", "latency.png"):
        assert (out / name).stat().st_size > 0, name
    [scenario] = summary["scenarios"]
    assert scenario["name"] == "batching" and [s["users"] for s in scenario["steps"]] == [1, 4]
    for step in scenario["steps"]:
        assert step["requests"] > 0 and step["failures"] == 0 and step["rps"] > 0, step
        assert 0 < step["p50"] <= step["p95"] <= step["p99"], step
        assert step["batches"]["classifier"]["batches"] > 0, step
    assert "| batching | 4 |" in (out / "report.md").read_text()


def test_payloads_fall_back_to_examples_without_data(tmp_path):
    written = payloads.write(tmp_path / "p.json", tmp_path / "no-data-here")
    assert written["source"] == "built-in examples"
    assert json.loads((tmp_path / "p.json").read_text())["texts"] == payloads.FALLBACK_TEXTS


def test_payloads_sample_is_seeded_and_varied(export_data_dir):
    first, again = payloads.sample(export_data_dir, 30, 10), payloads.sample(export_data_dir, 30, 10)
    assert first == again and len(first["texts"]) == 30 and len(first["prompts"]) == 10
    lengths = sorted(len(t) for t in first["texts"])
    assert lengths[-1] > lengths[0]
    assert all(0 < len(p.split()) <= payloads.PROMPT_WORDS[1] for p in first["prompts"])


def _step(users, rps, failures=0):
    return {"users": users, "rps": rps, "failures": failures}


def test_saturation_is_where_throughput_stops_growing_or_requests_fail():
    assert report.saturation([_step(1, 10), _step(4, 30), _step(16, 32), _step(64, 33)])["users"] == 16
    assert report.saturation([_step(1, 10), _step(4, 30), _step(16, 60, failures=3)])["users"] == 16
    assert report.saturation([_step(1, 10), _step(4, 30)])["users"] is None


def test_batching_ratio_at_32_users():
    summary = {"users": [1, 32], "scenarios": [
        {"name": "batching", "steps": [_step(1, 10), _step(32, 200)]},
        {"name": "no-batching", "steps": [_step(1, 10), _step(32, 40)]}]}
    r = report.ratios(summary)
    assert r["batching_vs_no_batching"] == {"users": 32, "ratio": 5.0, "target": 4.0, "met": True}
    assert r["by_users"]["batching / no-batching"] == {"1": 1.0, "32": 5.0}


def test_help_names_every_flag():
    proc = subprocess.run([sys.executable, "-m", "loadtests.run", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("--artifacts", "--scenarios", "--users", "--duration", "--endpoint", "--out", "--smoke"):
        assert flag in proc.stdout

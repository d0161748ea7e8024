"""The soak and overload scripts can't rot: short runs against the exported tiny models (about 30 s
on 2 CPU cores), plus their arithmetic. The real runs and their figures: docs/LOADTESTS.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests import overload, soak

ROOT = Path(__file__).resolve().parents[1]


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)


@pytest.mark.slow
def test_soak_smoke(exported, export_data_dir, tmp_path):
    proc = run("loadtests.soak", "--artifacts", str(exported), "--data-dir", str(export_data_dir),
               "--users", "2", "--duration", "8", "--warmup", "2", "--window", "3", "--sample-every", "0.5",
               "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "soak.json").read_text())
    assert result["requests"]["requests"] > 0 and result["other_failures"] == 0
    assert {"glowing", "glowing-scorer", "glowing-generator"} <= set(result["samples"][-1]["rss"])
    assert result["rss"]["growth_pct"] is not None and result["after_load_status"] == 200
    assert (tmp_path / "soak.png").stat().st_size > 0


@pytest.mark.slow
def test_overload_smoke_sheds_and_recovers(exported, export_data_dir, tmp_path):
    proc = run("loadtests.overload", "--artifacts", str(exported), "--data-dir", str(export_data_dir),
               "--phases", "48:4,2:3", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    storm, calm = json.loads((tmp_path / "overload.json").read_text())["phases"]
    assert storm["ok"] > 0 and storm["other"] == {} and calm["shed"] == 0 and calm["ok"] > 0
    assert calm["server_ms"]["200"]["n"] > 0 and calm["probe_ms"]["requests"] > 0


def test_growth_compares_the_end_with_the_window_after_warmup():
    samples = [{"t": t, "total": 100.0 if t < 10 else 110.0} for t in range(0, 40)]
    g = soak.growth(samples, warmup=5, window=3)
    assert g["start_mib"] == 100.0 and g["end_mib"] == 110.0 and g["growth_pct"] == 10.0


def test_server_side_reads_the_access_log(tmp_path):
    log = tmp_path / "serve.log"
    log.write_text(
        "2026-11-22T07:14:06+0000 [INFO] [entry_service:glowing:1] 127.0.0.1:1 (scheme=http,method=POST,"
        "path=/score,type=application/json,length=699) (status=503,type=application/json,length=113) 1.5ms (trace=1)\n"
        "2026-11-22T07:14:07+0000 [INFO] [service:glowing-scorer:1] _ (scheme=http,method=POST,path=/score,"
        "type=x,length=1) (status=200,type=application/json,length=24) 9.0ms (trace=2)\n")
    import calendar
    import time

    t = calendar.timegm(time.strptime("2026-11-22T07:14:06", "%Y-%m-%dT%H:%M:%S"))
    assert overload.server_side(log, t - 5, t + 5) == {"503": {"n": 1, "p50": 1.5, "p99": 1.5, "max": 1.5}}

"""The load test can't rot: ``python -m loadtests.run --smoke`` against the exported tiny models
(one scenario, users 1 and 4, 5 s steps), once with one Locust process and once in Locust's distributed
mode (``--workers 2``); a SIGTERM in the middle of a distributed step; Locust's master against a slow
loopback server; the report's arithmetic. About 95 s on 2 shared CPU cores, 20 s of it building the
tiny models.

Locust runs only as its own CLI process (``loadtests.run`` starts it): importing it here, next to
ssl/httpx, would die in gevent's monkey-patching."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from loadtests import distributed, payloads, report, run

ROOT = Path(__file__).resolve().parents[1]
MARK = "LOADTEST_TEST_MARK"  # set in a run's environment: its server and Locust processes inherit it


def _smoke(exported, export_data_dir, out: Path, *extra: str) -> tuple[dict, str]:
    """Run ``loadtests.run --smoke`` into ``out``; its summary, and the mark its processes carry."""
    mark = uuid.uuid4().hex
    proc = subprocess.run([sys.executable, "-m", "loadtests.run", "--smoke", "--artifacts", str(exported),
                           "--data-dir", str(export_data_dir), "--out", str(out), *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ, MARK: mark})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text()), mark


def _marked_processes(mark: str) -> list[str]:
    """Command lines of the live processes that carry ``mark`` in their environment."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"{MARK}={mark}".encode() in environ.read_bytes().split(b"\0"):
                found.append(environ.with_name("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def single(exported, export_data_dir, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("loadtest")
    return _smoke(exported, export_data_dir, out)[0], out


@pytest.mark.slow
def test_smoke_run_writes_the_report(single):
    summary, out = single
    for name in ("report.md", "throughput.png", "latency.png"):
        assert (out / name).stat().st_size > 0, name
    [scenario] = summary["scenarios"]
    assert scenario["name"] == "engine" and [s["users"] for s in scenario["steps"]] == [1, 4]
    for step in scenario["steps"]:
        assert step["requests"] > 0 and step["failures"] == 0 and step["rps"] > 0, step
        assert 0 < step["p50"] <= step["p95"] <= step["p99"], step
        assert step["batches"]["classifier"]["batches"] > 0, step
        assert set(step["gc"]) == {"glowing", "glowing-scorer", "glowing-generator"}, step  # read from /metrics
        assert all(g["collections"] >= 0 and g["ms"] >= 0 for g in step["gc"].values()), step
    report_md = (out / "report.md").read_text()
    assert "| engine | 4 |" in report_md and "## Full garbage collections" in report_md
    assert summary["workers"] == 0 and all(s["requests_by_worker"] == [s["requests"]] for s in scenario["steps"])


@pytest.mark.slow
def test_distributed_run_counts_add_up_and_the_report_keeps_its_shape(single, exported, export_data_dir, tmp_path):
    """``--workers 2``: a Locust master and two workers against the same tiny server. At each step the
    workers' own totals add up to the master's count, which is what the server scored (one text per
    request), and summary.json and report.md have the single-process run's shape."""
    out = tmp_path / "distributed"
    summary, mark = _smoke(exported, export_data_dir, out, "--workers", "2")
    assert not _marked_processes(mark)  # master, workers and server all gone
    one = single[0]
    assert summary["workers"] == 2 and set(summary) == set(one)
    [scenario] = summary["scenarios"]
    assert [s["users"] for s in scenario["steps"]] == [1, 4]
    for step, reference in zip(scenario["steps"], one["scenarios"][0]["steps"]):
        assert set(step) == set(reference) and set(step["batches"]) == set(reference["batches"])
        assert step["requests"] > 0 and step["failures"] == 0 and step["locust_rc"] == 0, step
        assert len(step["requests_by_worker"]) == 2 and sum(step["requests_by_worker"]) == step["requests"], step
        assert step["batches"]["classifier"]["items"] == step["requests"], step  # the server saw every one
        assert 0 < step["p50"] <= step["p95"] <= step["p99"], step
    assert all(n > 0 for n in scenario["steps"][1]["requests_by_worker"])  # 4 users: 2 on each worker
    for name in ("raw/engine_score_u4_worker0.log", "raw/engine_score_u4_worker1.log"):
        assert (out / name).is_file(), name
    text = (out / "report.md").read_text()
    assert "a master and 2 worker processes" in text and "| engine | 4 |" in text
    shape = [line.split("|")[1] for line in text.splitlines() if line.startswith("| ")]
    assert shape == [line.split("|")[1] for line in (single[1] / "report.md").read_text().splitlines()
                     if line.startswith("| ")]


@pytest.mark.slow
def test_sigterm_stops_the_master_the_workers_and_the_server(exported, export_data_dir, tmp_path):
    out, mark = tmp_path / "stopped", uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-m", "loadtests.run", "--artifacts", str(exported), "--data-dir",
                             str(export_data_dir), "--out", str(out), "--scenarios", "engine", "--users", "4",
                             "--duration", "120", "--workers", "2"], cwd=ROOT, env={**os.environ, MARK: mark},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        counts = [out / "raw" / f"engine_score_u4_worker{i}_counts.json" for i in (0, 1)]
        deadline = time.monotonic() + 120
        while not all(c.is_file() for c in counts):  # both workers have reported: the step is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-3000:]
            time.sleep(0.5)
        assert len(_marked_processes(mark)) >= 4  # this run, its server, the master and two workers
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(1)
    assert not _marked_processes(mark)


class _SlowScorer(BaseHTTPRequestHandler):
    """``POST /score`` answered after 1.5 s; counts what it answered."""
    answered = 0
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802  (the http.server API)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(1.5)
        body = b'{"results": [{"label": "positive", "p_positive": 0.9}]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        with self.lock:
            type(self).answered += 1

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_distributed_master_keeps_the_requests_that_finish_after_the_run_time(tmp_path):
    """Every user is mid-request when the run time ends (1.5 s answers): the workers report those
    requests more than 0.5 s after the master's "quit", which Locust's master alone would drop. All of
    them reach the master's count, the workers' totals and the server's count agree."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowScorer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        prefix = tmp_path / "slow"
        rc = run.run_locust(f"http://127.0.0.1:{server.server_port}", "ScoreUser", 8, 4, prefix, {},
                            tmp_path / "master.log", workers=2)
    finally:
        server.shutdown()
        server.server_close()
    step = report.read_step(prefix, "score")
    by_worker = distributed.worker_requests(prefix, 2, "score")
    assert rc == 0 and step["failures"] == 0, (tmp_path / "master.log").read_text()[-2000:]
    assert by_worker[0] > 0 and by_worker[1] > 0
    assert step["requests"] == sum(by_worker) == _SlowScorer.answered, (step, by_worker, _SlowScorer.answered)


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


def test_before_serves_another_checkout_as_its_own_scenario(tmp_path, monkeypatch):
    """``--before CHECKOUT``: scenario 'before' is served from that checkout (``bentoml serve`` run in
    it) with its own defaults, after the others unless --scenarios places it; it needs --before, and
    the checkout must be a Glowing one. The engine's ratios over it are in the report."""
    artifacts, old = tmp_path / "artifacts", tmp_path / "old"
    artifacts.mkdir()
    (artifacts / "manifest.json").write_text("{}")
    (old / "service").mkdir(parents=True)
    (old / "service" / "service.py").write_text("")
    served = []

    class Unstartable:  # records how each scenario's server was started; none of them starts
        def __init__(self, artifacts, log, env=None, cwd=run.ROOT):
            served.append((log.name, env, cwd))

        def wait_ready(self):
            raise RuntimeError("not started in this test")

        def stop(self):
            pass

    monkeypatch.setattr(run, "Server", Unstartable)
    base = ["--artifacts", str(artifacts), "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "out")]
    assert run.main(base + ["--scenarios", "engine,batching", "--before", str(old)]) == 0
    assert [(name, cwd) for name, _, cwd in served] == [
        ("engine_serve.log", run.ROOT), ("batching_serve.log", run.ROOT), ("before_serve.log", old.resolve())]
    assert served[2][1] == {"GLOWING_MAX_CONCURRENCY": run.MAX_CONCURRENCY}  # its own defaults
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["scenarios"][2]["name"] == "before" and str(old) in summary["scenarios"][2]["description"]
    # the report's settings column names the checkout; written although no server started (no latency to plot)
    assert f"| before | the service of {old} " in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "latency.png").stat().st_size > 0
    assert run.parse_args(base + ["--scenarios", "before,engine", "--before", str(old)]).scenario_list == \
        ["before", "engine"]
    for bad in (["--scenarios", "engine,before"], ["--before", str(tmp_path)]):
        with pytest.raises(SystemExit):
            run.parse_args(base + bad)


def test_engine_ratios_over_the_checkout_before():
    summary = {"users": [16, 32], "scenarios": [
        {"name": "engine", "steps": [{**_step(16, 900), "p99": 30}, {**_step(32, 1000), "p99": 40}]},
        {"name": "before", "steps": [{**_step(16, 300), "p99": 90}, {**_step(32, 700), "p99": 35}]}]}
    r = report.ratios(summary)["engine_vs_before"]
    assert r["16"] == {"ratio": 3.0, "target": 1.6, "met": True, "p99": [30, 90], "p99_not_worse": True}
    assert r["32"]["ratio"] == 1.43 and not r["32"]["met"] and not r["32"]["p99_not_worse"]


@pytest.mark.slow
def test_help_names_every_flag():
    proc = subprocess.run([sys.executable, "-m", "loadtests.run", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    for flag in ("--artifacts", "--scenarios", "--users", "--duration", "--endpoint", "--out", "--smoke",
                 "--workers", "--before"):
        assert flag in proc.stdout


@pytest.mark.slow
def test_serving_benchmark_smoke_compares_both_modes(exported, export_data_dir, tmp_path):
    """loadtests.serving end to end on the tiny models: both modes, every part of the report."""
    out = tmp_path / "serving"
    proc = subprocess.run([sys.executable, "-m", "loadtests.serving", "--smoke", "--artifacts", str(exported),
                           "--data-dir", str(export_data_dir), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["modes"]) == {"adaptive", "engine"} and (out / "serving.png").stat().st_size > 0
    for mode in summary["modes"].values():
        assert all(v is not None for v in (*mode["lone_before"].values(), *mode["lone_after"].values()))
        assert [s["users"] for s in mode["ladder"]] == [1, 4] and all(s["requests"] > 0 for s in mode["ladder"])
        assert all(s["ttft_p50"] is not None for s in mode["stream"])
        assert mode["cancellation"]["abandoned"] == 3
    assert summary["modes"]["engine"]["cancellation"]["running_rows_gauge"] == 0
    report = (out / "report.md").read_text()
    assert "| generate_8 |" in report and "| engine |" in report and "| 4 |" in report


def test_reviews_benchmark_report_puts_both_modes_side_by_side():
    from loadtests.reviews import markdown, parse_args

    step = {"accepted_per_s": 10.0, "p50": 200.0, "p99": 400.0, "wasted_tokens_per_accepted": 30.0}
    modes = {"rounds": {"lone": {"p50": 300.0}, "ladder": [step, step], "strict": step},
             "pipeline": {"lone": {"p50": 150.0}, "ladder": [step, {**step, "accepted_per_s": 20.0}], "strict": step}}
    report = markdown({"command": "python -m loadtests.reviews", "machine": {"cpu": "x"}, "users": [1, 16],
                       "modes": modes, "in_process_ms": {"rounds": 100.0, "pipeline": 100.0},
                       "floor_ratio": {"rounds": 3.0, "pipeline": 1.5}})
    assert "| 16 clients: accepted reviews/s | 10.0 | 20.0 | 2.0 |" in report
    assert "| lone /reviews n 3, p50 ms | 300.0 | 150.0 | 0.5 |" in report and "pipeline 100.0" in report
    assert parse_args(["--smoke"]).user_list == [1, 4]


@pytest.mark.slow
def test_process_cpu_names_each_server_process(exported, export_data_dir):
    """loadtests.process_cpu on the tiny models: requests/s and CPU per request of each server process."""
    proc = subprocess.run([sys.executable, "-m", "loadtests.process_cpu", "--artifacts", str(exported), "--users", "2",
                           "--duration", "1.5", "--warmup", "0.5", "--data-dir", str(export_data_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    step = next(line for line in lines if "clients:" in line)
    assert step.split()[0] == "2" and float(step.split()[2]) > 0
    assert any("glowing-scorer" in line and "CPU-ms/request" in line for line in lines)
    assert any("glowing (API)" in line for line in lines)

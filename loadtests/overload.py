"""Overload: far more clients than the server can take, then the normal load again.

    flock /tmp/glowing-heavy.lock .venv/bin/python -m loadtests.overload --artifacts artifacts --out reports/overload
    .venv/bin/python -m loadtests.overload --phases 64:30,16:20       # shorter (about 1.5 minutes)

Starts ``bentoml serve`` with the default settings (``GLOWING_MAX_CONCURRENCY`` 32) on a free loopback
port and runs closed-loop clients against ``/score`` (one IMDB review per request), phase after phase:
by default 128 clients for 60 s (4x the saturation load of 32 users, docs/LOADTESTS.md), then 16 for 30 s.
The clients retry at once, ignoring ``Retry-After``: the worst case. Each request's status and latency
is recorded; per phase it prints the throughput, the share shed with 503, the latency of the 503s and
of the successes as the clients saw it and as the API worker logged it (from the moment the request
reached the application: the difference is time spent waiting for a CPU-starved event loop, on the
server or in the client process), anything else (which should not exist), and writes ``overload.json``.
It is asyncio + httpx, not Locust: one process holds the 128 clients, and Locust's statistics do not
separate the latency of a 503 from that of a 200. That process competes for the same two cores, so
its own latencies include its own event-loop lag; a separate light probe process (standard library,
one request at a time, every 0.2 s) measures what a well-behaved client sees during each phase.

What it measured on the cpu-preset models, with the machine: docs/LOADTESTS.md, "Overload".
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from loadtests import payloads
from loadtests.run import machine
from loadtests.server import Server


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


async def phase(url: str, clients: int, seconds: float, texts: list[str], headers: dict) -> list[tuple]:
    """(status, latency ms) of every request of ``clients`` closed-loop clients for ``seconds``; a
    transport error has the exception's name for a status."""
    out: list[tuple] = []
    deadline = time.monotonic() + seconds
    # A pooled connection idle for the server's keep-alive time (uvicorn: 5 s, httpx's default expiry too)
    # can be closed by the server just as the client reuses it: expire them earlier.
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits, headers=headers) as client:
        async def user(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                t0 = time.monotonic()
                try:
                    status = (await client.post("/score", json={"texts": [rng.choice(texts)]})).status_code
                except httpx.HTTPError as err:
                    status = f"{type(err).__name__}: {err}"[:120]
                out.append((status, (time.monotonic() - t0) * 1000))

        await asyncio.gather(*(user(i) for i in range(clients)))
    return out


ACCESS = re.compile(r"^(\S+) \[INFO\] \[entry_service:glowing:\d+\] .*path=/score.*\(status=(\d+),[^)]*\) ([0-9.]+)ms")


def server_side(log: Path, start: float, end: float) -> dict:
    """p50/p99/max of the API worker's own duration of the /score answers logged within [start, end)
    (whole seconds: one second is left out at each edge), by status."""
    by_status: dict[str, list[float]] = {}
    for line in log.read_text(errors="replace").splitlines():
        m = ACCESS.match(line)
        if not m:
            continue
        t = calendar.timegm(time.strptime(m.group(1)[:19], "%Y-%m-%dT%H:%M:%S"))  # BentoML logs UTC
        if start + 1 <= t < end - 1:
            by_status.setdefault(m.group(2), []).append(float(m.group(3)))
    return {status: {"n": len(v), "p50": percentile(v, 0.5), "p99": percentile(v, 0.99), "max": percentile(v, 1.0)}
            for status, v in sorted(by_status.items())}


PROBE = """
import json, sys, time, urllib.request, urllib.error
url, key, body = sys.argv[1], sys.argv[2], json.dumps({"texts": ["A probe: is the service answering?"]}).encode()
headers = {"Content-Type": "application/json", **({"Authorization": "Bearer " + key} if key else {})}
while True:
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/score", data=body, headers=headers), timeout=300) as r:
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    except OSError as e:
        status = type(e).__name__
    print(json.dumps([status, round((time.monotonic() - t0) * 1000, 1)]), flush=True)
    time.sleep(0.2)
"""


def probe_summary(lines: list[str]) -> dict:
    results = [json.loads(line) for line in lines if line.startswith("[")]
    out: dict = {"requests": len(results)}
    for status in sorted({str(s) for s, _ in results}):
        ms = [m for s, m in results if str(s) == status]
        out[status] = {"n": len(ms), "p50": percentile(ms, 0.5), "p99": percentile(ms, 0.99), "max": percentile(ms, 1.0)}
    return out


def summarize(name: str, clients: int, seconds: float, results: list[tuple]) -> dict:
    ok = [ms for s, ms in results if s == 200]
    shed = [ms for s, ms in results if s == 503]
    other: dict[str, int] = {}
    for s, _ in results:
        if s not in (200, 503):
            other[str(s)] = other.get(str(s), 0) + 1
    return {"phase": name, "clients": clients, "seconds": seconds, "requests": len(results),
            "ok": len(ok), "shed": len(shed), "other": other,
            "ok_per_s": round(len(ok) / seconds, 1), "shed_share": round(len(shed) / max(len(results), 1), 3),
            "ok_ms": {"p50": percentile(ok, 0.5), "p99": percentile(ok, 0.99), "max": percentile(ok, 1.0)},
            "shed_ms": {"p50": percentile(shed, 0.5), "p99": percentile(shed, 0.99), "max": percentile(shed, 1.0),
                        "mean": round(statistics.fmean(shed), 1) if shed else None}}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m loadtests.overload", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifacts", type=Path, default=Path(os.environ.get("GLOWING_ARTIFACTS", "artifacts")),
                    help="artifacts folder the service serves (GLOWING_ARTIFACTS; default: artifacts)")
    ap.add_argument("--phases", default="128:60,16:30",
                    help="comma list of CLIENTS:SECONDS, run in order (default: 128:60,16:30 = 4x saturation, "
                    "then the saturation load halved)")
    ap.add_argument("--data-dir", type=Path, default=None, help="folder with imdb/test.parquet for the payloads "
                    "(default: $GLOWING_DATA_DIR or ../shared/data; built-in examples when missing)")
    ap.add_argument("--out", type=Path, default=Path("reports/overload"), help="output folder (default: reports/overload)")
    args = ap.parse_args(argv)
    try:
        args.phase_list = [(int(c), float(s)) for c, s in (p.split(":") for p in args.phases.split(","))]
        assert all(c >= 1 and s > 0 for c, s in args.phase_list)
    except (ValueError, AssertionError):
        ap.error(f"--phases: CLIENTS:SECONDS pairs, got {args.phases!r}")
    if not (args.artifacts / "manifest.json").is_file():
        ap.error(f"--artifacts: {args.artifacts} has no manifest.json (make models && make export)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the server
    args.out.mkdir(parents=True, exist_ok=True)
    texts = payloads.write(args.out / "payloads.json", args.data_dir)["texts"]
    key = os.environ.get("GLOWING_API_KEY", "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    server = Server(args.artifacts.resolve(), args.out / "serve.log")
    phases = []
    try:
        print(f"ready after {server.wait_ready():.1f} s on {server.url}", flush=True)
        for i, (clients, seconds) in enumerate(args.phase_list):
            started = time.time()
            probe_log = args.out / f"probe_{i + 1}.jsonl"
            with open(probe_log, "w") as plog:
                probe = subprocess.Popen([sys.executable, "-c", PROBE, server.url, key], stdout=plog)
                try:
                    results = asyncio.run(phase(server.url, clients, seconds, texts, headers))
                finally:
                    probe.terminate()
                    probe.wait(10)
            phases.append(summarize(f"{i + 1}", clients, seconds, results))
            p = phases[-1]
            time.sleep(1.5)  # the access log is written after the answer
            p["server_ms"] = server_side(server.log, started, time.time() - 1.5)
            p["probe_ms"] = probe_summary(probe_log.read_text().splitlines())
            print(f"phase {p['phase']}: {clients} clients, {seconds:.0f} s: {p['requests']} requests, "
                  f"{p['ok_per_s']} ok/s, shed {p['shed']} ({p['shed_share']:.0%}), other {p['other'] or 0}; "
                  f"503 in p50 {p['shed_ms']['p50']} / p99 {p['shed_ms']['p99']} / max {p['shed_ms']['max']} ms; "
                  f"200 in p50 {p['ok_ms']['p50']} / p99 {p['ok_ms']['p99']} / max {p['ok_ms']['max']} ms; "
                  f"as logged by the API worker: {p['server_ms']}; a separate probe client saw: {p['probe_ms']}",
                  flush=True)
    finally:
        server.stop()
    result = {"command": "python -m loadtests.overload " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine(), "artifacts": str(args.artifacts), "phases": phases}
    (args.out / "overload.json").write_text(json.dumps(result, indent=1))
    return 1 if any(p["other"] for p in phases) else 0


if __name__ == "__main__":
    raise SystemExit(main())
